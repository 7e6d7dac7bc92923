import os
import socket
import time

from tiles.scratch import LOCK_GRACE_S, hold_lock, is_orphan, release_lock, scratch_tag


def test_a_scratch_is_an_orphan_only_when_no_run_can_still_hold_it(tmp_path):
    host, here = socket.gethostname(), str(os.getpid())
    assert scratch_tag().startswith(f"{host}-{here}-")
    scratch = tmp_path / ".out.tif.tmp-x"
    assert not is_orphan(scratch, host, here)  # no lock file: this live process's
    assert is_orphan(scratch, host, "999999999")  # no lock file, a process that is gone
    assert not is_orphan(scratch, "another-host", "999999999")  # another machine's: unknown
    lock = hold_lock(scratch)
    assert not is_orphan(scratch, host, "999999999")  # held: the lock decides, not the name
    release_lock(lock, keep_file=True)
    assert not is_orphan(scratch, host, here)  # unheld, but just made: maybe not locked yet
    old = time.time() - 2 * LOCK_GRACE_S
    os.utime(scratch.with_name(scratch.name + ".lock"), (old, old))
    assert is_orphan(scratch, host, here)  # unheld and older: its run is gone

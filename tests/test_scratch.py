import os
import socket
import time

import pytest

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


def test_use_locks_share_readers_and_keep_a_writer_alone(tmp_path):
    from tiles.scratch import InUse, in_use_lock, using

    store = tmp_path / "s.zarr"
    with using(store), using(store):  # two trainings read one store
        rebuild = using(store, exclusive=True)
        with pytest.raises(InUse), rebuild:  # a rebuild is refused meanwhile
            pass
    with using(store, exclusive=True):
        with pytest.raises(InUse), using(store):
            pass
        with pytest.raises(InUse), using(store, exclusive=True):
            pass
    assert not in_use_lock(store).exists()  # the writer that held it alone removed it
    with using(store):
        pass
    assert in_use_lock(store).exists()  # readers leave it (others may hold it)


def test_a_lock_file_removed_before_it_was_locked_is_taken_again(tmp_path, monkeypatch):
    """A writer removes the lock file as it leaves: a reader that had opened the old file
    must not lock that one, or a third process could lock the new file beside it."""
    import fcntl

    from tiles.scratch import InUse, in_use_lock, using

    store = tmp_path / "s.zarr"
    real, calls = fcntl.flock, []

    def flock_after_removal(file, mode):
        calls.append(mode)
        if len(calls) == 1:
            in_use_lock(store).unlink()  # its last holder left in between
        return real(file, mode)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    with using(store):
        assert len(calls) == 2  # locked the file now at the path, not the removed one
        monkeypatch.setattr(fcntl, "flock", real)
        with pytest.raises(InUse), using(store, exclusive=True):
            pass


def test_a_store_named_through_a_link_shares_its_target_s_lock(tmp_path):
    """A config naming the store by a symbolic link took another lock than the rebuild
    naming it directly, and the rebuild swapped the scene under the training."""
    from tiles.scratch import InUse, using

    real = tmp_path / "data" / "s.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "s-link.zarr"
    link.symlink_to(real)
    with using(link), pytest.raises(InUse), using(real, exclusive=True):
        pass

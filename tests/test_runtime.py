"""The allocator setting keeps freed tensor memory in the process (no fresh page faults); the
switch for the compiled CPU loops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from geodnn import runtime

# allocate and free 80 MB of tensors per round (more than glibc's largest automatic trim
# threshold, 64 MB, so plain malloc returns it every round); count the rounds' minor faults
PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, json, resource, sys
    import torch
    from geodnn.runtime import retain_freed_memory

    def faults(rounds=20):
        for _ in range(2):  # reach the steady state first
            blocks = [torch.ones(1 << 20) for _ in range(20)]
            del blocks
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            blocks = [torch.ones(1 << 20) for _ in range(20)]
            del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2

    def mmapped_bytes_of_new_block():
        before = libc.mallinfo2().hblkhd
        block = torch.ones(4 << 20)  # 16 MB: below the 32 MB threshold, so on the heap
        return libc.mallinfo2().hblkhd - before

    plain = faults()
    applied = retain_freed_memory()
    retained = faults()
    mmapped = mmapped_bytes_of_new_block()
    result = {"plain": plain, "applied": applied, "retained": retained, "mmapped": mmapped}
    print(json.dumps(result))
    """
)


def _probe(env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(runtime._libc() is None, reason="needs glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    result = _probe()
    assert result["applied"] is True
    round_pages = 20 * (4 << 20) // 4096  # one round's memory in 4 KiB pages
    # plain glibc may or may not return a round's memory (it depends on what the heap held
    # before; measured 1,024 to 409,000 faults here), so only the retained run is bounded
    assert result["retained"] < round_pages  # at most the heap's one-time growth
    assert result["mmapped"] == 0


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(runtime.OPT_OUT, "0")
    assert runtime.retain_freed_memory() is False


def test_compiled_loops_follow_the_switch_and_a_missing_module(monkeypatch):
    pytest.importorskip("numba")
    loops = runtime.compiled_loops("geodnn.parallel.compress_kernels", "quantize_loop")
    assert loops is not None and loops[0].__name__ == "quantize_loop"
    assert runtime.compiled_loops("geodnn.no_such_kernels", "loop") is None  # torch instead
    monkeypatch.setenv(runtime.FUSED_SWITCH, "0")
    assert runtime.compiled_loops("geodnn.parallel.compress_kernels", "quantize_loop") is None


def test_stop_signals_raise_takes_over_default_handlers_only():
    import os
    import signal

    from geodnn.runtime import StopSignal, stop_signals_raise

    kept = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under `nohup`
    try:
        with stop_signals_raise():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: the command goes on
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(StopSignal) as stop, stop_signals_raise():
            os.kill(os.getpid(), signal.SIGHUP)
        assert stop.value.signum == signal.SIGHUP
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # given back
    finally:
        signal.signal(signal.SIGHUP, kept)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_swallowed_on_the_way_is_raised_again_before_an_irreversible_step():
    """Python ignores an exception raised in a `__del__` (it prints "Exception ignored"): a
    stop signal that lands there must still stop the command before it commits outputs."""
    import gc
    import os
    import signal

    from geodnn.runtime import StopSignal, raise_if_stopped, stop_signals_raise

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here; its error is ignored

    with pytest.raises(StopSignal) as stop, stop_signals_raise():
        Finalized()
        gc.collect()
        raise_if_stopped()  # the command went on; this is where it stops
    assert stop.value.signum == signal.SIGTERM
    with stop_signals_raise():  # a new block starts with a clean record
        raise_if_stopped()


def test_a_ctrl_c_swallowed_on_the_way_is_raised_again():
    """A helper saw `geodnn run` finish ('done', exit 0) after 3 of 16 Ctrl-Cs: the
    KeyboardInterrupt had landed in a weakref callback, which Python ignores."""
    import gc
    import os
    import signal

    from geodnn.runtime import raise_if_stopped, stop_signals_raise

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt), stop_signals_raise():
        Finalized()
        gc.collect()
        raise_if_stopped()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_follow_parent_says_whether_the_parent_named_in_the_environment_is_still_there():
    """Run in a child process: the parent-death signal it sets stays with the process."""
    code = (
        "import os, sys; from geodnn.runtime import follow_parent\n"
        "print(follow_parent('UNSET_PID'), follow_parent('MY_PARENT'), follow_parent('OTHER'))"
    )
    env = {**os.environ, "MY_PARENT": str(os.getpid()), "OTHER": "1"}
    env.pop("UNSET_PID", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "False"], out.stderr

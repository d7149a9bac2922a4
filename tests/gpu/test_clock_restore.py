"""The clocks are put back to what was there before (issue 11, defect 7): on SIGHUP/SIGQUIT/SIGUSR1 as on SIGTERM,
to an earlier lock rather than a blanket reset, with one restore owner per GPU for several backend objects, after an
interrupt arriving right after a successful write, and with the saved values in a failed Jetson restore."""
import json
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from splitlora.gpu import ALLOW_CLOCK_CONTROL_ENV, ClockPermissionError, GPUBackendError
from splitlora.gpu.jetson import JetsonBackend
from splitlora.gpu.nvml import NVMLBackend
from tests.fakes.fake_pynvml import FakeNVML
from tests.fakes.sysfs import make_jetson_sysfs

REPO = Path(__file__).resolve().parents[2]
SET, RESET = "nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks"


@pytest.fixture(autouse=True)
def _no_env_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_CLOCK_CONTROL_ENV, raising=False)


def limits(node):
    return int((node / "min_freq").read_text()), int((node / "max_freq").read_text())


# ------------------------------------------------------------------ the window after a successful write
def test_interrupt_right_after_a_successful_set_leaves_nothing_locked():
    fake = FakeNVML(interrupt_after={SET})
    gpu = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    interrupted = False
    try:  # (pytest.raises lets a KeyboardInterrupt through to end the session)
        with gpu.locked_clock(1e9):
            pytest.fail("the block must not run")
    except KeyboardInterrupt:
        interrupted = True
    assert interrupted
    assert fake.locked is None and fake.names()[-1] == RESET
    assert not gpu.is_locked
    fake.interrupt_after.clear()
    with gpu.locked_clock(1.5e9):  # usable again
        assert fake.locked == (1500, 1500)
    assert fake.locked is None


# ------------------------------------------------------------------ several objects on one GPU
@pytest.mark.parametrize("first_out", ["older", "newer"])
def test_two_nvml_objects_on_one_gpu_share_one_restore_owner(first_out):
    fake = FakeNVML()
    a = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    b = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    lock_a, lock_b = a.locked_clock(1e9), b.locked_clock(6e8)
    lock_a.__enter__()
    lock_b.__enter__()
    assert fake.locked == (600, 600)
    if first_out == "older":  # a leaves while b still holds its lock: b's lock stays in force
        lock_a.__exit__(None, None, None)
        assert fake.locked == (600, 600) and b.is_locked and not a.is_locked
        lock_b.__exit__(None, None, None)
    else:  # b leaves first: a's lock is put back, not a reset
        lock_b.__exit__(None, None, None)
        assert fake.locked == (1005, 1005) and a.is_locked
        lock_a.__exit__(None, None, None)
    assert fake.locked is None and not a.is_locked and not b.is_locked
    assert fake.names().count(RESET) == 1


def test_two_jetson_objects_on_one_node_share_one_restore_owner(tmp_path):
    node = make_jetson_sysfs(tmp_path, min_hz=306000000, max_hz=816000000)
    a = JetsonBackend(sysfs_root=tmp_path, allow_clock_control=True)
    b = JetsonBackend(devfreq_node=node, allow_clock_control=True)
    with a.locked_clock(714e6):
        with b.locked_clock(408e6):
            assert limits(node) == (408000000, 408000000)
        assert limits(node) == (714000000, 714000000)  # b's exit puts a's lock back
    assert limits(node) == (306000000, 816000000)
    lock_a = a.locked_clock(714e6)
    lock_a.__enter__()
    with b.locked_clock(408e6):
        lock_a.__exit__(None, None, None)  # a leaves first: b's lock stays
        assert limits(node) == (408000000, 408000000) and b.is_locked
    assert limits(node) == (306000000, 816000000)


# ------------------------------------------------------------------ an earlier lock is put back, not wiped
def test_nvml_refuses_to_wipe_an_administrators_lock_it_cannot_read():
    fake = FakeNVML(locked=(1500, 1500))
    gpu = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    with pytest.raises(GPUBackendError, match=r"previous_lock_mhz.*nvidia-smi -i 0 -rgc"):
        with gpu.locked_clock(6e8):
            pytest.fail("the block must not run")
    assert fake.locked == (1500, 1500) and SET not in fake.names() and RESET not in fake.names()


def test_nvml_puts_the_previous_lock_back():
    fake = FakeNVML(locked=(1500, 1995))
    gpu = NVMLBackend(pynvml_module=fake, allow_clock_control=True, previous_lock_mhz=(1500, 1995))
    with gpu.locked_clock(6e8):
        assert fake.locked == (600, 600)
    assert fake.locked == (1500, 1995) and RESET not in fake.names()
    with pytest.raises(ValueError, match="previous_lock_mhz"):
        NVMLBackend(pynvml_module=fake, previous_lock_mhz=(1995, 1500))


def test_jetson_puts_an_administrators_lock_back(tmp_path):
    node = make_jetson_sysfs(tmp_path, min_hz=510000000, max_hz=510000000)
    gpu = JetsonBackend(sysfs_root=tmp_path, allow_clock_control=True)
    with gpu.locked_clock(306e6):
        assert limits(node) == (306000000, 306000000)
    assert limits(node) == (510000000, 510000000)


def test_failed_jetson_restore_names_the_saved_values_and_the_command(tmp_path, monkeypatch):
    node = make_jetson_sysfs(tmp_path, min_hz=306000000, max_hz=816000000)
    gpu = JetsonBackend(sysfs_root=tmp_path, allow_clock_control=True)
    with pytest.raises(GPUBackendError) as info:
        with gpu.locked_clock(510e6):
            def refuse(attr, value_hz):
                raise ClockPermissionError(f"jetson: cannot write {node / attr}")
            monkeypatch.setattr(gpu, "_write_sysfs", refuse)
    msg = str(info.value)
    assert "min_freq=306000000 Hz" in msg and "max_freq=816000000 Hz" in msg, msg
    assert f"echo 816000000 > {node}/max_freq" in msg and "None" not in msg
    assert not gpu.is_locked


# ------------------------------------------------------------------ signals: a subprocess holding a lock
CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path[:0] = [{repo!r}]
    kind, log = sys.argv[1], sys.argv[2]
    if kind == "nvml":
        from tests.fakes.fake_pynvml import FakeNVML
        from splitlora.gpu.nvml import NVMLBackend
        gpu = NVMLBackend(pynvml_module=FakeNVML(log_path=log), allow_clock_control=True)
    else:
        from splitlora.gpu.jetson import JetsonBackend
        gpu = JetsonBackend(sysfs_root=log, allow_clock_control=True)
    with gpu.locked_clock(6e8 if kind == "nvml" else 408e6):
        print("LOCKED", flush=True)
        time.sleep(30)
    print("NOT REACHED", flush=True)
""")


def _no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGQUIT's default action would dump core


def _held_then_signalled(tmp_path, kind, sig, arg):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    proc = subprocess.Popen([sys.executable, str(script), kind, str(arg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, preexec_fn=_no_core)
    line = proc.stdout.readline()
    assert line.strip() == "LOCKED", proc.stderr.read()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -sig, err  # it still dies of the signal
    assert "NOT REACHED" not in out
    return err


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_nvml_lock_restored_on_signal(tmp_path, sig):
    log = tmp_path / "calls.jsonl"
    _held_then_signalled(tmp_path, "nvml", sig, log)
    calls = [json.loads(x)[0] for x in log.read_text().splitlines()]
    assert SET in calls and RESET in calls and calls.index(RESET) > calls.index(SET)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_jetson_lock_restored_on_signal(tmp_path, sig):
    root = tmp_path / "sysfs"
    node = make_jetson_sysfs(root, min_hz=306000000, max_hz=612000000)
    _held_then_signalled(tmp_path, "jetson", sig, root)
    assert limits(node) == (306000000, 612000000)

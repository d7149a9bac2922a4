"""NVML backend against a recording fake pynvml that raises the REAL pynvml error classes."""
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pynvml
import pytest

from splitlora.gpu import (ALLOW_CLOCK_CONTROL_ENV, ClockControlNotAllowedError, ClockPermissionError,  # noqa: E402
                           GPUBackendError, GPUNotAvailableError, NotSupportedError, get_gpu_backend)
from splitlora.gpu.nvml import NVMLBackend  # noqa: E402
from tests.fakes.fake_pynvml import FakeNVML  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SET, RESET = "nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks"


@pytest.fixture(autouse=True)
def _no_env_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_CLOCK_CONTROL_ENV, raising=False)


def test_fake_uses_real_error_classes():
    assert FakeNVML().NVMLError_NoPermission is pynvml.NVMLError_NoPermission


def test_reads_clocks_sorted_at_max_memory_clock():
    fake = FakeNVML()
    gpu = NVMLBackend(pynvml_module=fake)
    assert gpu.supported_clocks_mhz() == [210, 600, 1005, 1500, 1995, 2535]
    assert ("nvmlDeviceGetSupportedGraphicsClocks", "handle0", 9001) in fake.calls
    assert gpu.current_clock_mhz() == 2535
    assert gpu.device_name() == "Fake GeForce RTX 4060 Ti"
    gpu.close()
    assert fake.initialised == 0


def test_lock_readback_reset():
    fake = FakeNVML()
    with NVMLBackend(pynvml_module=fake, allow_clock_control=True) as gpu:
        with gpu.locked_clock(1.4e9) as lock:
            assert (lock.target_mhz, lock.readback_mhz) == (1500, 1500)
            assert lock.applied_hz == 1.5e9
            assert fake.locked == (1500, 1500)
        assert fake.locked is None
    names = fake.names()
    assert names.count(SET) == 1 and names.count(RESET) == 1
    assert names.index(SET) < names.index("nvmlDeviceGetClockInfo", names.index(SET)) < names.index(RESET)
    assert (SET, "handle0", 1500, 1500) in fake.calls


def test_reset_after_exception_in_locked_region():
    fake = FakeNVML()
    gpu = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    with pytest.raises(ZeroDivisionError):
        with gpu.locked_clock(1e9):
            1 / 0
    assert fake.names()[-1] == RESET and fake.locked is None


def test_not_opted_in_raises_and_never_sets():
    fake = FakeNVML()
    gpu = NVMLBackend(pynvml_module=fake)
    with pytest.raises(ClockControlNotAllowedError, match=ALLOW_CLOCK_CONTROL_ENV):
        with gpu.locked_clock(1e9):
            pass
    assert SET not in fake.names() and RESET not in fake.names()


def test_env_var_opts_in(monkeypatch):
    monkeypatch.setenv(ALLOW_CLOCK_CONTROL_ENV, "1")
    fake = FakeNVML()
    with NVMLBackend(pynvml_module=fake).locked_clock(2e9) as lock:
        assert lock.target_mhz == 1995


def test_no_permission_maps_to_clock_permission_error():
    fake = FakeNVML(fail={SET: pynvml.NVMLError_NoPermission})
    gpu = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    with pytest.raises(ClockPermissionError, match="Insufficient Permissions") as info:
        with gpu.locked_clock(1e9):
            pytest.fail("the block must not run")
    assert isinstance(info.value.__cause__, pynvml.NVMLError_NoPermission)
    assert not gpu.is_locked and RESET not in fake.names()


def test_not_supported_maps():
    fake = FakeNVML(fail={SET: pynvml.NVMLError_NotSupported,
                          "nvmlDeviceGetTotalEnergyConsumption": pynvml.NVMLError_NotSupported})
    gpu = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    with pytest.raises(NotSupportedError):
        with gpu.locked_clock(1e9):
            pass
    with pytest.raises(NotSupportedError):
        gpu.begin_window()


@pytest.mark.parametrize("err", [pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded])
def test_no_library_or_driver_is_gpu_not_available(err):
    with pytest.raises(GPUNotAvailableError, match="nvmlInit"):
        NVMLBackend(pynvml_module=FakeNVML(fail={"nvmlInit": err}))


def test_bad_index_is_gpu_not_available_and_shuts_down():
    fake = FakeNVML()
    with pytest.raises(GPUNotAvailableError):
        NVMLBackend(3, pynvml_module=fake)
    assert fake.initialised == 0


def test_other_nvml_error_is_backend_error():
    fake = FakeNVML(fail={"nvmlDeviceGetClockInfo": pynvml.NVMLError_Unknown})
    with pytest.raises(GPUBackendError, match="nvmlDeviceGetClockInfo"):
        NVMLBackend(pynvml_module=fake).current_clock_mhz()


def test_failed_reset_is_loud():
    fake = FakeNVML(fail={RESET: pynvml.NVMLError_Unknown})
    gpu = NVMLBackend(pynvml_module=fake, allow_clock_control=True)
    with pytest.raises(GPUBackendError, match="FAILED to restore.*nvidia-smi"):
        with gpu.locked_clock(1e9):
            pass


def test_energy_window_converts_mj_to_j():
    fake = FakeNVML(energy_mj=[1_000_000, 1_250_500])
    gpu = NVMLBackend(pynvml_module=fake)
    with gpu.energy_window() as w:
        time.sleep(0.01)
    assert w.measurement.energy_j == pytest.approx(250.5)
    assert 0.005 < w.measurement.time_s < 5


def test_sigterm_handler_installed_only_while_locked():
    before = signal.getsignal(signal.SIGTERM)
    gpu = NVMLBackend(pynvml_module=FakeNVML(), allow_clock_control=True)
    with gpu.locked_clock(1e9):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) == before


def test_factory_nvml_with_injected_module(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu = get_gpu_backend("nvml")
    assert isinstance(gpu, NVMLBackend) and not gpu.clock_control_allowed
    gpu = get_gpu_backend("auto", allow_clock_control=True, fallback_to_emulated=True, kappa=1e-27,
                          f_min_hz=1e8, f_max_hz=1e9, step_hz=1e8)  # emulated kwargs unused: NVML works
    assert isinstance(gpu, NVMLBackend) and gpu.clock_control_allowed
    with pytest.raises(TypeError, match="kappa"):  # without the fallback, an emulated kwarg is a mistake
        get_gpu_backend("auto", kappa=1e-27)


# ------------------------------------------------------------------ subprocess: SIGTERM and atexit
CHILD = textwrap.dedent("""
    import signal, sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    from tests.fakes.fake_pynvml import FakeNVML
    from splitlora.gpu.nvml import NVMLBackend
    mode = sys.argv[1]
    if mode == "chain":
        def prev(signum, frame):
            print("PREVIOUS HANDLER", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, prev)
    gpu = NVMLBackend(pynvml_module=FakeNVML(log_path=sys.argv[2]), allow_clock_control=True)
    if mode == "atexit":
        gpu.locked_clock(1e9).__enter__()   # never exited: the atexit hook must reset
        print("LOCKED", flush=True)
        sys.exit(0)
    with gpu.locked_clock(1e9):
        print("LOCKED", flush=True)
        time.sleep(20)
    print("NOT REACHED", flush=True)
""")


def _run_child(tmp_path, mode, send_sigterm):
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), tests=str(REPO / "tests")))
    proc = subprocess.Popen([sys.executable, str(script), mode, str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "LOCKED", proc.stderr.read()
    if send_sigterm:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    calls = [json.loads(x)[0] for x in log.read_text().splitlines()]
    return proc.returncode, out, err, calls


def test_sigterm_inside_locked_region_resets_and_dies_of_sigterm(tmp_path):
    rc, out, err, calls = _run_child(tmp_path, "default", send_sigterm=True)
    assert rc == -signal.SIGTERM, err
    assert SET in calls and calls.index(RESET) > calls.index(SET)
    assert "NOT REACHED" not in out


def test_sigterm_chains_previous_handler(tmp_path):
    rc, out, err, calls = _run_child(tmp_path, "chain", send_sigterm=True)
    assert rc == 7, err
    assert "PREVIOUS HANDLER" in out
    assert calls.count(RESET) == 1 and calls.index(RESET) > calls.index(SET)


def test_atexit_resets_a_lock_left_open(tmp_path):
    rc, out, err, calls = _run_child(tmp_path, "atexit", send_sigterm=False)
    assert rc == 0, err
    assert calls[-1] == RESET or calls.index(RESET) > calls.index(SET)

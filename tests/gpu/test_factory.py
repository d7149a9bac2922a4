"""The backend factory (auto, explicit kinds, logged fallback) and the optional zeus backend."""
import logging
import sys
import types

import pynvml
import pytest

from splitlora.gpu import EmulatedBackend, GPUNotAvailableError, get_gpu_backend  # noqa: E402
from tests.fakes.fake_pynvml import FakeNVML  # noqa: E402

EMU = dict(kappa=1e-27, f_min_hz=210e6, f_max_hz=2535e6, step_hz=15e6)


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """No NVML library, and a sysfs root without a GPU devfreq node."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(fail={"nvmlInit": pynvml.NVMLError_LibraryNotFound}))
    return tmp_path


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="kind='cuda'.*one of"):
        get_gpu_backend("cuda")


def test_auto_without_gpu_raises_typed_error_with_reasons(no_gpu):
    with pytest.raises(GPUNotAvailableError, match="nvml: .*jetson: .*fallback_to_emulated=True"):
        get_gpu_backend("auto", sysfs_root=no_gpu)


def test_fallback_is_logged(no_gpu, caplog):
    with caplog.at_level(logging.WARNING, logger="splitlora.gpu"):
        gpu = get_gpu_backend("auto", fallback_to_emulated=True, sysfs_root=no_gpu, **EMU)
    assert isinstance(gpu, EmulatedBackend)
    assert any(r.levelno == logging.WARNING and "EMULATED" in r.getMessage() for r in caplog.records)


def test_explicit_nvml_fallback_is_logged(no_gpu, caplog):
    with caplog.at_level(logging.WARNING, logger="splitlora.gpu"):
        gpu = get_gpu_backend("nvml", fallback_to_emulated=True, gpu_index=0, **EMU)
    assert isinstance(gpu, EmulatedBackend) and "NVML Shared Library Not Found" in caplog.text


def test_real_machine_without_gpu():
    """On this CPU machine the real pynvml finds no library: typed error, never a silent emulation."""
    try:
        import pynvml as real
        real.nvmlInit()
        real.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present")
    except real.NVMLError:
        pass
    with pytest.raises(GPUNotAvailableError):
        get_gpu_backend("nvml")


def test_zeus_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "zeus", None)  # import zeus -> ImportError
    monkeypatch.setitem(sys.modules, "zeus.monitor", None)
    with pytest.raises(GPUNotAvailableError, match=r"splitlora\[zeus\]"):
        get_gpu_backend("zeus", pynvml_module=FakeNVML())


class _FakeZeusMonitor:
    def __init__(self, gpu_indices, sync_execution_with):
        self.gpu_indices = gpu_indices
        self.events = []

    def begin_window(self, key):
        self.events.append(("begin", key))

    def end_window(self, key, cancel=False):
        self.events.append(("end", key, cancel))
        return types.SimpleNamespace(time=2.0, total_energy=300.0)


def test_zeus_backend_windows_and_nvml_clocks():
    from splitlora.gpu.zeus import ZeusBackend

    fake_zm = types.SimpleNamespace(ZeusMonitor=_FakeZeusMonitor)
    nv = FakeNVML()
    gpu = ZeusBackend(pynvml_module=nv, zeus_monitor_module=fake_zm, allow_clock_control=True)
    with gpu.locked_clock(1.5e9), gpu.energy_window("step") as w:
        pass
    assert (w.measurement.time_s, w.measurement.energy_j) == (2.0, 300.0)
    assert nv.names().count("nvmlDeviceResetGpuLockedClocks") == 1
    with pytest.raises(RuntimeError):
        with gpu.energy_window("step"):
            raise RuntimeError
    assert gpu._monitor.events[-1][2] is True  # cancelled, not left open

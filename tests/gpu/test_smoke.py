"""scripts/gpu_smoke.py: clear 'no NVIDIA GPU' exit here; read-only unless explicitly asked (fake NVML)."""
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest

from splitlora.gpu import ALLOW_CLOCK_CONTROL_ENV  # noqa: E402
from splitlora.gpu.smoke import EXIT_NO_GPU, EXIT_OK, EXIT_PERMISSION, EXIT_USAGE, main  # noqa: E402
from tests.fakes.fake_pynvml import FakeNVML  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_smoke.py"
SET, RESET = "nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks"


@pytest.fixture(autouse=True)
def _no_env_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_CLOCK_CONTROL_ENV, raising=False)


def _nvml_present() -> bool:
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except pynvml.NVMLError:
        return False


@pytest.mark.skipif(_nvml_present(), reason="an NVIDIA driver is present")
def test_script_without_gpu_exits_3_with_clear_message():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_NO_GPU == 3
    assert "no NVIDIA GPU" in proc.stderr


def test_lock_without_opt_in_is_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--lock-clock-mhz", "1500"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == EXIT_USAGE and "--allow-clock-control" in proc.stderr


def test_read_only_run_with_fake_nvml(capsys):
    fake = FakeNVML(energy_mj=[5_000, 17_500])
    assert main([], pynvml_module=fake, workload=lambda: None) == EXIT_OK
    out = capsys.readouterr().out
    assert "210 600 1005 1500 1995 2535" in out and "12.500 J" in out
    assert SET not in fake.names() and RESET not in fake.names()


def test_lock_with_opt_in_resets(capsys):
    fake = FakeNVML()
    rc = main(["--lock-clock-mhz", "1400", "--allow-clock-control"], pynvml_module=fake, workload=lambda: None)
    assert rc == EXIT_OK
    assert (SET, "handle0", 1500, 1500) in fake.calls and fake.names().count(RESET) == 1
    assert "read back 1500 MHz" in capsys.readouterr().out


def test_lock_without_permission_exits_4(capsys):
    fake = FakeNVML(fail={SET: pynvml.NVMLError_NoPermission})
    rc = main(["--lock-clock-mhz", "1400", "--allow-clock-control"], pynvml_module=fake, workload=lambda: None)
    assert rc == EXIT_PERMISSION and "permission denied" in capsys.readouterr().err


def test_cuda_missing_is_no_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main([], pynvml_module=FakeNVML()) == EXIT_NO_GPU
    assert "no NVIDIA GPU" in capsys.readouterr().err

"""Jetson backend on a fake devfreq/INA3221 sysfs tree in tmp_path."""

import pytest

from splitlora.gpu import (ALLOW_CLOCK_CONTROL_ENV, ClockControlNotAllowedError, ClockPermissionError,  # noqa: E402
                           GPUNotAvailableError, NotSupportedError, get_gpu_backend)
from splitlora.gpu.jetson import JetsonBackend, find_gpu_devfreq_node  # noqa: E402
from tests.fakes.sysfs import make_jetson_sysfs  # noqa: E402

FREQS = (306000000, 408000000, 510000000, 612000000, 714000000, 816000000)


@pytest.fixture(autouse=True)
def _no_env_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_CLOCK_CONTROL_ENV, raising=False)


def recording(gpu, node):
    """Wrap the backend's sysfs writes: record (attr, Hz), check min <= max after each, move cur_freq."""
    writes = []
    real = gpu._write_sysfs

    def write(attr, value_hz):
        real(attr, value_hz)
        writes.append((attr, value_hz))
        lo, hi = int((node / "min_freq").read_text()), int((node / "max_freq").read_text())
        assert lo <= hi, f"min_freq {lo} > max_freq {hi} after writing {attr}"
        (node / "cur_freq").write_text(f"{min(max(int((node / 'cur_freq').read_text()), lo), hi)}\n")

    gpu._write_sysfs = write
    return writes


@pytest.mark.parametrize("name", ["57000000.gpu", "17000000.gp10b", "17000000.gv11b", "17000000.ga10b"])
def test_discovers_gpu_node_by_name(tmp_path, name):
    make_jetson_sysfs(tmp_path, node_name=name)
    (tmp_path / "sys/class/devfreq/13e10000.host1x").mkdir()
    assert find_gpu_devfreq_node(tmp_path).name == name


def test_discovers_gpu_node_by_of_node_name(tmp_path):
    make_jetson_sysfs(tmp_path, node_name="devfreq0", of_node_name="gpu")
    assert find_gpu_devfreq_node(tmp_path).name == "devfreq0"


def test_no_gpu_node_is_not_available(tmp_path):
    (tmp_path / "sys/class/devfreq/13e10000.host1x").mkdir(parents=True)
    with pytest.raises(GPUNotAvailableError, match="no GPU devfreq node"):
        JetsonBackend(sysfs_root=tmp_path)
    with pytest.raises(GPUNotAvailableError):
        JetsonBackend(sysfs_root=tmp_path / "nothing")


def test_reads_clocks_in_mhz(tmp_path):
    make_jetson_sysfs(tmp_path, cur_hz=612000000)
    gpu = JetsonBackend(sysfs_root=tmp_path)
    assert gpu.supported_clocks_mhz() == [f / 1e6 for f in FREQS]
    assert gpu.current_clock_mhz() == 612.0


def test_not_opted_in_writes_nothing(tmp_path):
    node = make_jetson_sysfs(tmp_path)
    gpu = JetsonBackend(sysfs_root=tmp_path)
    writes = recording(gpu, node)
    with pytest.raises(ClockControlNotAllowedError, match="allow_clock_control=True"):
        with gpu.locked_clock(500e6):
            pass
    assert writes == []


def test_lowering_writes_min_first_and_restores(tmp_path):
    node = make_jetson_sysfs(tmp_path, min_hz=408000000, max_hz=816000000)
    gpu = JetsonBackend(sysfs_root=tmp_path, allow_clock_control=True)
    writes = recording(gpu, node)
    with gpu.locked_clock(500e6) as lock:  # nearest: 510 MHz, below the current max
        assert lock.target_mhz == 510.0 and lock.readback_mhz == 510.0
        assert writes == [("min_freq", 510000000), ("max_freq", 510000000)]
    # restore raises max back first, then min
    assert writes[2:] == [("max_freq", 816000000), ("min_freq", 408000000)]
    assert (node / "min_freq").read_text().strip() == "408000000"
    assert (node / "max_freq").read_text().strip() == "816000000"


def test_raising_writes_max_first_and_restores_after_exception(tmp_path):
    node = make_jetson_sysfs(tmp_path, min_hz=306000000, max_hz=408000000, cur_hz=408000000)
    gpu = JetsonBackend(sysfs_root=tmp_path, allow_clock_control=True)
    writes = recording(gpu, node)
    with pytest.raises(KeyError):
        with gpu.locked_clock(800e6):  # nearest: 816 MHz, above the current max
            assert writes == [("max_freq", 816000000), ("min_freq", 816000000)]
            raise KeyError("inside")
    assert writes[2:] == [("min_freq", 306000000), ("max_freq", 408000000)]
    assert not gpu.is_locked


def test_read_only_sysfs_is_clock_permission_error(tmp_path, monkeypatch):
    node = make_jetson_sysfs(tmp_path)
    for f in ("min_freq", "max_freq"):
        (node / f).chmod(0o444)
    gpu = JetsonBackend(sysfs_root=tmp_path, allow_clock_control=True)
    # root ignores file modes: make the access check answer as for an unprivileged user
    monkeypatch.setattr("splitlora.gpu.jetson.os.access", lambda path, mode: False)
    with pytest.raises(ClockPermissionError, match="not writable"):
        with gpu.locked_clock(500e6):
            pass
    assert not gpu.is_locked


def test_write_refused_midway_is_undone(tmp_path):
    node = make_jetson_sysfs(tmp_path, min_hz=306000000, max_hz=816000000)
    gpu = JetsonBackend(sysfs_root=tmp_path, allow_clock_control=True)
    real_open = open
    refused = {"n": 0}

    def flaky_open(path, mode="r", *a, **kw):  # the second write (max_freq) fails like a read-only sysfs
        if "w" in mode and str(path).endswith("max_freq") and refused["n"] == 0:
            refused["n"] += 1
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **kw)

    import builtins
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", flaky_open)
        with pytest.raises(ClockPermissionError, match="cannot write"):
            with gpu.locked_clock(500e6):
                pass
    assert (node / "min_freq").read_text().strip() == "306000000"
    assert (node / "max_freq").read_text().strip() == "816000000"


def test_energy_from_ina3221_rails(tmp_path):
    make_jetson_sysfs(tmp_path, rails={"VDD_GPU_SOC": (5000, 2000), "VDD_CPU_CV": (5000, 1000),
                                       "VIN_SYS_5V0": (5000, 3000)})
    gpu = JetsonBackend(sysfs_root=tmp_path, sample_interval_s=0.002)
    assert gpu.power_rails == ["VDD_GPU_SOC"]
    gpu.begin_window()
    import time
    time.sleep(0.05)
    m = gpu.end_window()
    assert m.average_power_w == pytest.approx(10.0)  # 5000 mV x 2000 mA = 10 W, constant
    assert m.energy_j == pytest.approx(10.0 * m.time_s)
    total = JetsonBackend(sysfs_root=tmp_path, power_rails=("GPU", "CPU"))
    with total.energy_window() as w:
        time.sleep(0.01)
    assert w.measurement.average_power_w == pytest.approx(15.0)


def test_no_rails_energy_not_supported(tmp_path):
    make_jetson_sysfs(tmp_path)
    gpu = JetsonBackend(sysfs_root=tmp_path)
    with pytest.raises(NotSupportedError, match="INA3221"):
        gpu.begin_window()


def test_factory_jetson(tmp_path):
    make_jetson_sysfs(tmp_path)
    gpu = get_gpu_backend("jetson", sysfs_root=tmp_path)
    assert isinstance(gpu, JetsonBackend) and not gpu.clock_control_allowed


def test_energy_from_legacy_iio_rails(tmp_path):
    make_jetson_sysfs(tmp_path, node_name="57000000.gpu")
    iio = tmp_path / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    iio.mkdir(parents=True)
    for k, (name, mw) in enumerate([("POM_5V_IN", 4000), ("POM_5V_GPU", 1500), ("POM_5V_CPU", 800)]):
        (iio / f"rail_name_{k}").write_text(name + "\n")
        (iio / f"in_power{k}_input").write_text(f"{mw}\n")
    gpu = JetsonBackend(sysfs_root=tmp_path, sample_interval_s=0.002)
    assert gpu.power_rails == ["POM_5V_GPU"]
    with gpu.energy_window() as w:
        pass
    assert w.measurement.energy_j == pytest.approx(1.5 * w.measurement.time_s)

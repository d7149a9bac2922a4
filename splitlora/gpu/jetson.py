"""NVIDIA Jetson GPUs through Linux devfreq sysfs, and energy from the INA3221 power monitors.

Clocks are read and locked through the GPU's devfreq node (min_freq = max_freq, written in an order that keeps
min <= max); the energy integrates the sampled power of the chosen INA3221 rails (on Orin an upper bound on the
GPU's). Source: docs/model.md, "GPU clock and energy backends".
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from splitlora._validate import check_positive

from .common import ClockPermissionError, GPUBackendError, GPUClockBackend, GPUNotAvailableError, NotSupportedError

logger = logging.getLogger(__name__)

#: substrings of devfreq node names that identify a Jetson GPU
GPU_NODE_PATTERNS = ("gpu", "gv11b", "gp10b", "ga10b", "gm20b")

_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def find_gpu_devfreq_node(sysfs_root: str | os.PathLike = "/") -> Path:
    """Return the devfreq directory of the GPU under ``<sysfs_root>/sys/class/devfreq``.

    Raises:
        GPUNotAvailableError: no devfreq node looks like a GPU (not a Jetson, or sysfs not mounted).
    """
    base = Path(sysfs_root) / "sys" / "class" / "devfreq"
    if not base.is_dir():
        raise GPUNotAvailableError(f"jetson: no devfreq directory at {base} (not a Linux devfreq system)")
    nodes = sorted(p for p in base.iterdir() if p.is_dir())
    for node in nodes:
        if any(pat in node.name.lower() for pat in GPU_NODE_PATTERNS):
            return node
    for node in nodes:
        of_name = node / "device" / "of_node" / "name"
        try:
            if of_name.read_text().strip("\x00\n ").lower() == "gpu":
                return node
        except OSError:
            continue
    raise GPUNotAvailableError(f"jetson: no GPU devfreq node under {base} (looked for names containing "
                               f"{list(GPU_NODE_PATTERNS)} or device/of_node/name == 'gpu'; found "
                               f"{[n.name for n in nodes]})")


def _read_int(path: Path) -> int:
    return int(path.read_text().strip().split()[0])


# ---------------------------------------------------------------------------------- power rails
class PowerRail:
    """One INA3221 channel: ``label`` and a function returning its power in W."""

    def __init__(self, label: str, read_w: Callable[[], float]):
        self.label = label
        self.read_w = read_w

    def __repr__(self) -> str:
        return f"PowerRail({self.label!r})"


def find_power_rails(sysfs_root: str | os.PathLike = "/", labels: Sequence[str] = ("GPU",)) -> list[PowerRail]:
    """INA3221 rails under ``<sysfs_root>/sys/bus/i2c/drivers/ina3221*`` whose label contains one of
    ``labels`` (case-insensitive). hwmon rails read ``in{k}_input`` (mV) x ``curr{k}_input`` (mA);
    iio rails read ``in_power{k}_input`` (mW). Returns an empty list when none match.
    """
    root = str(Path(sysfs_root) / "sys" / "bus" / "i2c" / "drivers")
    wanted = [s.lower() for s in labels]
    rails: list[PowerRail] = []

    def match(label: str) -> bool:
        return any(w in label.lower() for w in wanted)

    for hw in sorted(glob.glob(os.path.join(root, "ina3221*", "*", "hwmon", "hwmon*"))):
        hw = Path(hw)
        for label_file in sorted(hw.glob("in*_label")):
            k = label_file.name[2:-len("_label")]
            label = label_file.read_text().strip()
            volt, curr = hw / f"in{k}_input", hw / f"curr{k}_input"
            if match(label) and volt.exists() and curr.exists():
                rails.append(PowerRail(label, lambda v=volt, c=curr: _read_int(v) * _read_int(c) / 1e6))
    for iio in sorted(glob.glob(os.path.join(root, "ina3221x", "*", "iio:device*"))):
        iio = Path(iio)
        for name_file in sorted(iio.glob("rail_name_*")):
            k = name_file.name[len("rail_name_"):]
            label = name_file.read_text().strip()
            power = iio / f"in_power{k}_input"
            if match(label) and power.exists():
                rails.append(PowerRail(label, lambda p=power: _read_int(p) / 1e3))
    return rails


class _RailSampler:
    """Integrates the summed rail power (W) over time into joules with the trapezoid rule."""

    def __init__(self, rails: Sequence[PowerRail], interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.rails = list(rails)
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._users = 0
        self._last: tuple[float, float] | None = None
        self.energy_j = 0.0

    def sample(self) -> tuple[float, float]:
        """Take one sample now; return (time s, cumulative energy J)."""
        with self._lock:
            p = sum(r.read_w() for r in self.rails)
            t = self.clock()
            if self._last is not None:
                t0, p0 = self._last
                self.energy_j += 0.5 * (p + p0) * (t - t0)
            self._last = (t, p)
            return t, self.energy_j

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except OSError:
                logger.exception("jetson: reading the power rails failed")

    def start(self) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            self._last = None
            self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="splitlora-jetson-power", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


# -------------------------------------------------------------------------------------- backend
class JetsonBackend(GPUClockBackend):
    """A Jetson GPU: devfreq clocks (Hz in sysfs, MHz in this interface) and INA3221 rail energy.

    Args:
        sysfs_root: the folder that holds ``sys/`` (``"/"`` on a Jetson; a temporary tree in tests).
        devfreq_node: the GPU's devfreq directory, to skip discovery.
        allow_clock_control: allow ``locked_clock`` to write min_freq/max_freq
            (or set ``SPLITLORA_ALLOW_CLOCK_CONTROL=1``). Off by default: read-only.
        power_rails: label substrings of the INA3221 rails whose power is summed (default ``("GPU",)``;
            e.g. ``("VDD_IN",)`` for the whole module).
        sample_interval_s: period of the power-sampling thread in s.

    Raises:
        GPUNotAvailableError: no GPU devfreq node found.

    Sources: https://www.kernel.org/doc/Documentation/ABI/testing/sysfs-class-devfreq ,
    https://docs.kernel.org/hwmon/ina3221.html
    """

    name = "jetson"

    def __init__(self, *, sysfs_root: str | os.PathLike = "/", devfreq_node: str | os.PathLike | None = None,
                 allow_clock_control: bool = False, power_rails: Sequence[str] = ("GPU",),
                 sample_interval_s: float = 0.01):
        super().__init__(allow_clock_control=allow_clock_control)
        check_positive("sample_interval_s", sample_interval_s)
        self.sysfs_root = Path(sysfs_root)
        self.node = Path(devfreq_node) if devfreq_node is not None else find_gpu_devfreq_node(sysfs_root)
        for f in ("available_frequencies", "cur_freq", "min_freq", "max_freq"):
            if not (self.node / f).exists():
                raise GPUNotAvailableError(f"jetson: {self.node / f} is missing; not a usable devfreq node")
        self.power_rail_labels = tuple(power_rails)
        self._rails = find_power_rails(sysfs_root, self.power_rail_labels)
        self._sampler = _RailSampler(self._rails, sample_interval_s) if self._rails else None

    # ---- sysfs I/O -----------------------------------------------------------------------------
    def _read_hz(self, attr: str) -> int:
        return _read_int(self.node / attr)

    def _write_sysfs(self, attr: str, value_hz: int) -> None:
        """Write ``value_hz`` to ``<node>/<attr>``; PermissionError/EROFS -> ClockPermissionError."""
        path = self.node / attr
        try:
            with open(path, "w") as fh:
                fh.write(f"{int(value_hz)}\n")
        except OSError as exc:
            if isinstance(exc, PermissionError) or exc.errno in _PERMISSION_ERRNOS:
                raise ClockPermissionError(f"jetson: cannot write {path} ({exc}); changing the GPU clock "
                                           f"needs root and a writable sysfs") from exc
            raise GPUBackendError(f"jetson: writing {value_hz} Hz to {path} failed: {exc}") from exc

    def _set_limits_hz(self, new_min_hz: int, new_max_hz: int) -> None:
        """Write min_freq/max_freq so that min <= max after each write: max first when the new max is
        >= the current max (raising), min first otherwise (lowering)."""
        cur_max = self._read_hz("max_freq")
        if new_max_hz >= cur_max:
            self._write_sysfs("max_freq", new_max_hz)
            self._write_sysfs("min_freq", new_min_hz)
        else:
            self._write_sysfs("min_freq", new_min_hz)
            self._write_sysfs("max_freq", new_max_hz)

    def _clocks_hz(self) -> list[int]:
        text = (self.node / "available_frequencies").read_text().split()
        return sorted({int(x) for x in text})

    # ---- interface ---------------------------------------------------------------------------
    def supported_clocks_mhz(self) -> list[float]:
        """``available_frequencies`` converted from Hz to MHz, ascending."""
        return [hz / 1e6 for hz in self._clocks_hz()]

    def current_clock_mhz(self) -> float:
        """``cur_freq`` (Hz) in MHz."""
        return self._read_hz("cur_freq") / 1e6

    def _lock_clock_mhz(self, clock_mhz: float) -> None:
        hz = min(self._clocks_hz(), key=lambda c: abs(c - clock_mhz * 1e6))
        for attr in ("min_freq", "max_freq"):
            if not os.access(self.node / attr, os.W_OK):
                raise ClockPermissionError(f"jetson: {self.node / attr} is not writable; changing the GPU "
                                           f"clock needs root and a writable sysfs")
        saved = self._save_clock_state()
        try:
            self._set_limits_hz(hz, hz)
        except BaseException:
            try:  # undo a half-done change before reporting
                self._set_limits_hz(*saved)
            except Exception:
                logger.exception("jetson: could not undo a partial clock change; %s", self._manual_restore_hint(saved))
            raise

    def _save_clock_state(self) -> tuple[int, int]:
        """(min_freq, max_freq) in Hz: the limits in force (an administrator's lock included)."""
        return self._read_hz("min_freq"), self._read_hz("max_freq")

    def _restore_clock_state(self, state) -> None:
        self._set_limits_hz(*state) if state is not None else self._restore_clocks()

    def _restore_clocks(self) -> None:
        clocks = self._clocks_hz()
        self._set_limits_hz(clocks[0], clocks[-1])

    def _clock_owner_key(self) -> object:
        return ("jetson", os.path.realpath(self.node))

    def _manual_restore_hint(self, state=None) -> str:
        if state is None:
            return f"Restore {self.node}/min_freq and max_freq by hand."
        lo, hi = state
        return (f"Restore them by hand (saved values: min_freq={lo} Hz, max_freq={hi} Hz), as root: "
                f"echo {hi} > {self.node}/max_freq; echo {lo} > {self.node}/min_freq "
                "(if the first write fails, write min_freq first)")

    # ---- energy ------------------------------------------------------------------------------
    @property
    def power_rails(self) -> list[str]:
        """Labels of the INA3221 rails summed into the energy counter (empty: no energy)."""
        return [r.label for r in self._rails]

    def _require_sampler(self) -> _RailSampler:
        if self._sampler is None:
            raise NotSupportedError(f"jetson: no INA3221 power rail matching {list(self.power_rail_labels)} "
                                    f"under {self.sysfs_root / 'sys/bus/i2c/drivers'}; energy cannot be measured")
        return self._sampler

    def _on_window_open(self) -> None:
        self._require_sampler().start()

    def _on_window_close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()

    def _read_counters(self) -> tuple[float, float]:
        return self._require_sampler().sample()

"""Optional energy backend through ml-energy/zeus (``pip install 'splitlora[zeus]'``).

Energy windows go through ``zeus.monitor.ZeusMonitor`` (``begin_window(key)`` / ``end_window(key)``
returning a ``Measurement`` with ``time`` in s and ``total_energy`` in J; https://ml.energy/zeus/ ),
which picks the best counter for the GPU (the NVML energy counter, or power sampling on older GPUs).
Clock reading and locking are NVML's, inherited from :class:`~splitlora.gpu.nvml.NVMLBackend`.
Importing this module does not import zeus; constructing the backend does.
"""
from __future__ import annotations

import itertools
from types import ModuleType

from .common import EnergyMeasurement, GPUBackendError, GPUNotAvailableError
from .nvml import NVMLBackend


def _import_zeus_monitor() -> ModuleType:
    try:
        import zeus.monitor as zm
    except ImportError as exc:
        raise GPUNotAvailableError("zeus: the optional dependency zeus is not installed; "
                                   "install it with: pip install 'splitlora[zeus]'") from exc
    return zm


class ZeusBackend(NVMLBackend):
    """NVML clocks plus zeus energy windows on one GPU.

    Args:
        gpu_index: NVML/CUDA device index.
        allow_clock_control: as for :class:`NVMLBackend` (off by default).
        pynvml_module: pynvml module to use for the clock part (tests pass a fake).
        zeus_monitor_module: module providing ``ZeusMonitor`` (tests pass a fake); default ``zeus.monitor``.
        sync_execution_with: passed to ``ZeusMonitor`` (``"torch"`` synchronises CUDA at window edges).

    Raises:
        GPUNotAvailableError: zeus is not installed, or no NVIDIA GPU.
    """

    name = "zeus"
    _ids = itertools.count()

    def __init__(self, gpu_index: int = 0, *, allow_clock_control: bool = False,
                 pynvml_module: ModuleType | None = None, zeus_monitor_module: ModuleType | None = None,
                 sync_execution_with: str = "torch"):
        zm = zeus_monitor_module if zeus_monitor_module is not None else _import_zeus_monitor()
        super().__init__(gpu_index, allow_clock_control=allow_clock_control, pynvml_module=pynvml_module)
        try:
            self._monitor = zm.ZeusMonitor(gpu_indices=[gpu_index], sync_execution_with=sync_execution_with)
        except Exception as exc:
            self.close()
            raise GPUNotAvailableError(f"zeus: ZeusMonitor could not start on GPU {gpu_index}: {exc}") from exc
        self._prefix = f"splitlora-{next(self._ids)}-"

    def begin_window(self, name: str = "default") -> None:
        """Start zeus window ``name``.

        Raises:
            GPUBackendError: a window with this name is already open.
        """
        if name in self._windows:
            raise GPUBackendError(f"zeus: energy window {name!r} is already open")
        self._monitor.begin_window(self._prefix + name)
        self._windows[name] = (0.0, 0.0)

    def end_window(self, name: str = "default") -> EnergyMeasurement:
        """End zeus window ``name``; return its time (s) and total GPU energy (J).

        Raises:
            GPUBackendError: no window with this name is open.
        """
        if name not in self._windows:
            raise GPUBackendError(f"zeus: energy window {name!r} was not begun")
        del self._windows[name]
        m = self._monitor.end_window(self._prefix + name)
        return EnergyMeasurement(time_s=float(m.time), energy_j=float(m.total_energy))

    def _cancel_window(self, name: str) -> None:
        if self._windows.pop(name, None) is not None:
            try:
                self._monitor.end_window(self._prefix + name, cancel=True)
            except TypeError:  # older zeus without cancel=
                self._monitor.end_window(self._prefix + name)

"""NVIDIA GPUs through NVML (the ``pynvml`` module of nvidia-ml-py).

Supported and current graphics clocks, clock locking (``nvmlDeviceSetGpuLockedClocks``) and the mJ energy
counter, with NVML errors mapped to this package's typed errors. Source: docs/model.md, "GPU clock and energy
backends"; https://docs.nvidia.com/deploy/nvml-api/
"""
from __future__ import annotations

import time
from types import ModuleType

from splitlora.errors import InvalidParameterError

from .common import ClockPermissionError, GPUBackendError, GPUClockBackend, GPUNotAvailableError, NotSupportedError


#: NVML clocks event (throttle) reason bit: clocks limited by an applications-clocks or locked-clocks setting
_APPLICATIONS_CLOCKS_SETTING = 0x2


def _import_pynvml() -> ModuleType:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise GPUNotAvailableError("nvml: the module pynvml is missing; pip install nvidia-ml-py") from exc
    return pynvml


class NVMLBackend(GPUClockBackend):
    """One NVIDIA GPU through NVML: clocks (MHz), clock locking, and the mJ energy counter.

    Args:
        gpu_index: NVML device index (0-based; note NVML ignores CUDA_VISIBLE_DEVICES).
        allow_clock_control: allow ``locked_clock`` to call ``nvmlDeviceSetGpuLockedClocks``
            (or set ``SPLITLORA_ALLOW_CLOCK_CONTROL=1``). Off by default: read-only.
        pynvml_module: the pynvml module to use (tests pass a fake); default: ``import pynvml``.
        previous_lock_mhz: ``(min, max)`` MHz of a lock someone set before (``nvidia-smi -lgc min,max``), put back
            at the end instead of unlocking. NVML cannot read a lock back: without it, a GPU whose clocks NVML
            reports limited by a setting (clocks event reason "applications clocks setting") is refused, so that
            the restore never wipes a lock it cannot put back.

    Raises:
        GPUNotAvailableError: NVML library or driver missing, or no GPU at ``gpu_index``.
        GPUBackendError: any other NVML failure while initialising.

    Source: https://docs.nvidia.com/deploy/nvml-api/
    """

    name = "nvml"

    def __init__(self, gpu_index: int = 0, *, allow_clock_control: bool = False,
                 pynvml_module: ModuleType | None = None, previous_lock_mhz: tuple[int, int] | None = None):
        super().__init__(allow_clock_control=allow_clock_control)
        if isinstance(gpu_index, bool) or not isinstance(gpu_index, int) or gpu_index < 0:
            raise InvalidParameterError(f"gpu_index={gpu_index!r} is invalid: must be an integer >= 0")
        if previous_lock_mhz is not None:
            lo_hi = tuple(previous_lock_mhz)
            if len(lo_hi) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in lo_hi) \
                    or lo_hi[0] > lo_hi[1]:
                raise InvalidParameterError(f"previous_lock_mhz={previous_lock_mhz!r} is invalid: must be (min, max) "
                                            "integer MHz with 0 < min <= max")
            previous_lock_mhz = lo_hi
        self.previous_lock_mhz = previous_lock_mhz
        self._nvml = pynvml_module if pynvml_module is not None else _import_pynvml()
        self.gpu_index = gpu_index
        self._initialised = False
        self._call("nvmlInit", init=True)
        self._initialised = True
        try:
            self._handle = self._call("nvmlDeviceGetHandleByIndex", gpu_index, init=True)
        except BaseException:
            self.close()
            raise
        self._clocks_cache: list[float] | None = None

    # ---- error mapping -----------------------------------------------------------------------
    def _call(self, fn_name: str, *args, init: bool = False):
        """Call ``pynvml.<fn_name>(*args)`` and map NVML errors to this package's typed errors."""
        nv = self._nvml
        try:
            return getattr(nv, fn_name)(*args)
        except nv.NVMLError as exc:
            what = f"nvml: {fn_name} failed on GPU {self.gpu_index}: {exc}"
            unavailable = (nv.NVMLError_LibraryNotFound, nv.NVMLError_DriverNotLoaded, nv.NVMLError_GpuIsLost)
            if init:
                unavailable += (nv.NVMLError_NotFound, nv.NVMLError_InvalidArgument)
            if isinstance(exc, nv.NVMLError_NoPermission):
                raise ClockPermissionError(what + " (changing GPU clocks needs root, or "
                                           "`nvidia-smi -acp UNRESTRICTED` by an administrator)") from exc
            if isinstance(exc, nv.NVMLError_NotSupported):
                raise NotSupportedError(what) from exc
            if isinstance(exc, unavailable):
                raise GPUNotAvailableError(what + " (no NVIDIA GPU or driver usable here)") from exc
            raise GPUBackendError(what) from exc

    # ---- interface ---------------------------------------------------------------------------
    def device_name(self) -> str:
        """The GPU's product name (``nvmlDeviceGetName``)."""
        name = self._call("nvmlDeviceGetName", self._handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def supported_clocks_mhz(self) -> list[float]:
        """Supported graphics clocks in MHz, ascending, at the highest supported memory clock.

        Raises:
            NotSupportedError: the GPU does not report supported clocks.
            GPUBackendError: another NVML failure.
        """
        if self._clocks_cache is None:
            mem = self._call("nvmlDeviceGetSupportedMemoryClocks", self._handle)
            if not mem:
                raise NotSupportedError(f"nvml: GPU {self.gpu_index} reports no supported memory clocks")
            gfx = self._call("nvmlDeviceGetSupportedGraphicsClocks", self._handle, max(mem))
            self._clocks_cache = sorted({float(c) for c in gfx})
        return list(self._clocks_cache)

    def current_clock_mhz(self) -> float:
        """Current graphics clock in MHz (``nvmlDeviceGetClockInfo(handle, NVML_CLOCK_GRAPHICS)``)."""
        return float(self._call("nvmlDeviceGetClockInfo", self._handle, self._nvml.NVML_CLOCK_GRAPHICS))

    def _lock_clock_mhz(self, clock_mhz: float) -> None:
        mhz = int(round(clock_mhz))
        self._call("nvmlDeviceSetGpuLockedClocks", self._handle, mhz, mhz)

    def _restore_clocks(self) -> None:
        self._call("nvmlDeviceResetGpuLockedClocks", self._handle)

    def _clock_owner_key(self) -> object:
        return ("nvml", id(self._nvml), self.gpu_index)

    def _save_clock_state(self):
        """``previous_lock_mhz`` or None (unlocked); refuses a GPU NVML reports as limited by a clock setting."""
        if self.previous_lock_mhz is not None:
            return self.previous_lock_mhz
        nv = self._nvml
        getter = next((g for g in ("nvmlDeviceGetCurrentClocksEventReasons",
                                   "nvmlDeviceGetCurrentClocksThrottleReasons") if hasattr(nv, g)), None)
        try:
            reasons = int(self._call(getter, self._handle)) if getter else 0
        except NotSupportedError:
            reasons = 0
        if reasons & _APPLICATIONS_CLOCKS_SETTING:
            raise GPUBackendError(f"nvml: GPU {self.gpu_index}'s clocks are already limited by a clock setting (NVML "
                                  "clocks event reason 'applications clocks setting', e.g. an administrator's "
                                  "nvidia-smi -lgc). NVML cannot read that lock back, so the restore would wipe it: "
                                  "pass previous_lock_mhz=(min, max) to have it put back, or unlock first with "
                                  f"nvidia-smi -i {self.gpu_index} -rgc")
        return None

    def _restore_clock_state(self, state) -> None:
        if state is None:
            self._restore_clocks()
        else:
            self._call("nvmlDeviceSetGpuLockedClocks", self._handle, int(state[0]), int(state[1]))

    def _manual_restore_hint(self, state=None) -> str:
        if state is not None:
            return f"Put the previous lock back by hand: nvidia-smi -i {self.gpu_index} -lgc {state[0]},{state[1]}"
        return f"Reset them by hand: nvidia-smi -i {self.gpu_index} -rgc (--reset-gpu-clocks)"

    def energy_counter_mj(self) -> int:
        """Total energy since the driver was loaded, in mJ (``nvmlDeviceGetTotalEnergyConsumption``).

        Raises:
            NotSupportedError: the GPU has no energy counter (pre-Volta).
        """
        return int(self._call("nvmlDeviceGetTotalEnergyConsumption", self._handle))

    def _read_counters(self) -> tuple[float, float]:
        return time.monotonic(), self.energy_counter_mj() / 1000.0

    def close(self) -> None:
        """Restore a held lock, then ``nvmlShutdown``."""
        try:
            super().close()
        finally:
            if self._initialised:
                self._initialised = False
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # shutting down a broken NVML is not worth an error
                    pass

"""A fake ``pynvml`` module: the REAL pynvml error classes and constants, fake device functions that
record every call (``fake.calls``, and optionally one JSON line per call in ``log_path`` so a killed
subprocess leaves a trace).

Usage::

    fake = FakeNVML(fail={"nvmlDeviceSetGpuLockedClocks": pynvml.NVMLError_NoPermission})
    NVMLBackend(pynvml_module=fake)      # or monkeypatch.setitem(sys.modules, "pynvml", fake)
"""
from __future__ import annotations

import json
import types

import pynvml as _real


class FakeNVML(types.ModuleType):
    """One fake GPU. ``fail`` maps a function name to the NVMLError class it raises (an exception
    instance or class); ``energy_mj`` is a list of successive counter values (the last repeats)."""

    def __init__(self, *, graphics_clocks_mhz=(210, 600, 1005, 1500, 1995, 2535), memory_clocks_mhz=(405, 9001),
                 default_clock_mhz=2535, energy_mj=(1_000_000, 1_250_500), fail=None, log_path=None,
                 name=b"Fake GeForce RTX 4060 Ti", locked=None, interrupt_after=()):
        super().__init__("pynvml")
        for attr in dir(_real):  # real error classes and NVML_* constants
            if attr.startswith(("NVMLError", "NVML_")):
                setattr(self, attr, getattr(_real, attr))
        self.graphics_clocks_mhz = list(graphics_clocks_mhz)
        self.memory_clocks_mhz = list(memory_clocks_mhz)
        self.default_clock_mhz = default_clock_mhz
        self.energy_mj = list(energy_mj)
        self.fail = dict(fail or {})
        self.log_path = log_path
        self.device_name = name
        self.calls: list[tuple] = []
        self.locked: tuple[int, int] | None = locked  # an administrator's earlier lock (nvidia-smi -lgc)
        self.interrupt_after = set(interrupt_after)  # names of calls that raise KeyboardInterrupt AFTER succeeding
        self.initialised = 0

    # ---- recording -------------------------------------------------------------------------
    def _record(self, fn, *args):
        rec = (fn, *[a if isinstance(a, (int, float, str)) else repr(a) for a in args])
        self.calls.append(rec)
        if self.log_path:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
        err = self.fail.get(fn)
        if err is not None:
            raise err() if isinstance(err, type) else err

    def names(self) -> list[str]:
        """Names of the functions called, in order."""
        return [c[0] for c in self.calls]

    # ---- the NVML API subset -----------------------------------------------------------------
    def nvmlInit(self):
        self._record("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self):
        self._record("nvmlShutdown")
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        self._record("nvmlDeviceGetCount")
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        self._record("nvmlDeviceGetHandleByIndex", index)
        if index != 0:
            raise _real.NVMLError_InvalidArgument()
        return "handle0"

    def nvmlDeviceGetName(self, handle):
        self._record("nvmlDeviceGetName", handle)
        return self.device_name

    def nvmlDeviceGetSupportedMemoryClocks(self, handle):
        self._record("nvmlDeviceGetSupportedMemoryClocks", handle)
        return list(reversed(self.memory_clocks_mhz))

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle, mem_mhz):
        self._record("nvmlDeviceGetSupportedGraphicsClocks", handle, mem_mhz)
        return list(reversed(self.graphics_clocks_mhz))  # NVML lists them descending

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        self._record("nvmlDeviceGetClockInfo", handle, clock_type)
        return self.locked[1] if self.locked else self.default_clock_mhz

    def nvmlDeviceSetGpuLockedClocks(self, handle, min_mhz, max_mhz):
        self._record("nvmlDeviceSetGpuLockedClocks", handle, min_mhz, max_mhz)
        self.locked = (min_mhz, max_mhz)
        self._interrupt("nvmlDeviceSetGpuLockedClocks")

    def nvmlDeviceResetGpuLockedClocks(self, handle):
        self._record("nvmlDeviceResetGpuLockedClocks", handle)
        self.locked = None

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        """Bit 0x2 (applications clocks setting) while a lock is set, as NVML reports a locked clock."""
        self._record("nvmlDeviceGetCurrentClocksEventReasons", handle)
        return _real.nvmlClocksEventReasonApplicationsClocksSetting if self.locked else 0

    def _interrupt(self, fn):
        if fn in self.interrupt_after:  # Ctrl-C arriving just after the driver call succeeded
            raise KeyboardInterrupt

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self._record("nvmlDeviceGetTotalEnergyConsumption", handle)
        return self.energy_mj.pop(0) if len(self.energy_mj) > 1 else self.energy_mj[0]

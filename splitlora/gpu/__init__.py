"""GPU clock control and energy measurement behind one interface, and a factory to pick a backend.

:func:`get_gpu_backend` returns an ``emulated``, ``nvml``, ``jetson`` or ``zeus`` backend (``auto``: NVML, then
Jetson); setting clocks on real hardware is opt-in (``allow_clock_control=True`` or
``SPLITLORA_ALLOW_CLOCK_CONTROL=1``). Source: docs/model.md, "GPU clock and energy backends" (with an example).
"""
from __future__ import annotations

import inspect
import logging

from splitlora._validate import check_choice

from .common import (ALLOW_CLOCK_CONTROL_ENV, ClockControlNotAllowedError, ClockLock, ClockPermissionError,
                     EnergyMeasurement, EnergyWindow, GPUBackendError, GPUClockBackend, GPUNotAvailableError,
                     NotSupportedError, clock_control_allowed)
from .emulated import EmulatedBackend

logger = logging.getLogger(__name__)

BACKEND_KINDS = ("auto", "emulated", "nvml", "jetson", "zeus")


def _backend_class(kind: str) -> type[GPUClockBackend]:
    if kind == "emulated":
        return EmulatedBackend
    if kind == "nvml":
        from .nvml import NVMLBackend
        return NVMLBackend
    if kind == "jetson":
        from .jetson import JetsonBackend
        return JetsonBackend
    from .zeus import ZeusBackend
    return ZeusBackend


def _accepted(cls: type, kwargs: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def get_gpu_backend(kind: str = "auto", *, allow_clock_control: bool = False,
                    fallback_to_emulated: bool = False, **kwargs) -> GPUClockBackend:
    """Create a GPU clock/energy backend.

    Args:
        kind: ``"emulated"``, ``"nvml"``, ``"jetson"``, ``"zeus"``, or ``"auto"`` (NVML, then Jetson).
        allow_clock_control: let ``locked_clock`` change clocks on real hardware (else read-only; the
            environment variable ``SPLITLORA_ALLOW_CLOCK_CONTROL=1`` also opts in).
        fallback_to_emulated: when the requested hardware is unavailable, log a warning and return an
            emulated backend instead of raising. The emulated backend needs its own kwargs
            (``kappa``, ``f_min_hz``, ``f_max_hz``, ``step_hz``).
        **kwargs: constructor arguments; each candidate backend (and the fallback) gets those its
            constructor accepts, e.g. ``gpu_index``, ``sysfs_root``, ``kappa``.

    Raises:
        ValueError: unknown ``kind``.
        GPUNotAvailableError: no usable GPU for ``kind`` and no fallback asked for.
        TypeError: a kwarg that no candidate backend accepts.
    """
    check_choice("kind", kind, BACKEND_KINDS)
    if kind == "emulated":
        return EmulatedBackend(allow_clock_control=allow_clock_control, **kwargs)
    candidates = ["nvml", "jetson"] if kind == "auto" else [kind]
    classes = {cand: _backend_class(cand) for cand in candidates}
    known = set().union(*(_accepted(c, kwargs) for c in classes.values()))
    if fallback_to_emulated:
        known |= set(_accepted(EmulatedBackend, kwargs))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"get_gpu_backend(kind={kind!r}) got unexpected keyword arguments {unknown}")
    reasons = []
    for cand, cls in classes.items():
        try:
            return cls(allow_clock_control=allow_clock_control, **_accepted(cls, kwargs))
        except GPUNotAvailableError as exc:
            reasons.append(f"{cand}: {exc}")
    message = "no usable GPU backend for kind={!r}: {}".format(kind, "; ".join(reasons))
    if not fallback_to_emulated:
        raise GPUNotAvailableError(message + ". Pass fallback_to_emulated=True (with the emulated "
                                   "backend's kappa, f_min_hz, f_max_hz, step_hz) to emulate instead.")
    logger.warning("%s. Falling back to the EMULATED GPU backend (fallback_to_emulated=True): clocks and "
                   "energy are computed from the model, not measured.", message)
    return EmulatedBackend(allow_clock_control=allow_clock_control, **_accepted(EmulatedBackend, kwargs))


__all__ = [
    "ALLOW_CLOCK_CONTROL_ENV", "BACKEND_KINDS", "ClockControlNotAllowedError", "ClockLock",
    "ClockPermissionError", "EmulatedBackend", "EnergyMeasurement", "EnergyWindow", "GPUBackendError",
    "GPUClockBackend", "GPUNotAvailableError", "NotSupportedError", "clock_control_allowed",
    "get_gpu_backend",
]

"""The GPU clock-and-energy interface every backend implements, its typed errors and the restore guard.

:class:`GPUClockBackend`: supported and current clocks (read-only), ``locked_clock`` (opt-in on real hardware; the
clocks are always restored) and energy windows. Units are in the names: ``_hz``, ``_mhz``, ``_s``, ``_j``,
``_mj``. Source: docs/model.md, "GPU clock and energy backends".
"""
from __future__ import annotations

import abc
import atexit
import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from splitlora._validate import check_positive
from splitlora.errors import InvalidParameterError, SplitLoRAError

logger = logging.getLogger(__name__)

#: Environment variable that opts in to clock setting on real hardware (value ``1``, ``true`` or ``yes``).
ALLOW_CLOCK_CONTROL_ENV = "SPLITLORA_ALLOW_CLOCK_CONTROL"

NVML_DOCS_URL = "https://docs.nvidia.com/deploy/nvml-api/"
DEVFREQ_ABI_URL = "https://www.kernel.org/doc/Documentation/ABI/testing/sysfs-class-devfreq"


# --------------------------------------------------------------------------------------------- errors
class GPUBackendError(SplitLoRAError, RuntimeError):
    """Base class of every error raised by a GPU clock/energy backend."""


class GPUNotAvailableError(GPUBackendError):
    """No usable GPU for this backend: no driver or library (NVML), no devfreq GPU node, missing extra."""


class ClockPermissionError(GPUBackendError):
    """The OS or driver refused a clock change (NVML ``NoPermission``, read-only or root-owned sysfs)."""


class ClockControlNotAllowedError(GPUBackendError):
    """Clock setting was requested but the user did not opt in (see :func:`clock_control_allowed`)."""


class NotSupportedError(GPUBackendError):
    """The GPU or driver does not support this call (NVML ``NotSupported``, no power rails on a Jetson)."""


def clock_control_allowed(allow_clock_control: bool = False) -> bool:
    """True if clock setting is allowed: the argument is True or ``$SPLITLORA_ALLOW_CLOCK_CONTROL`` is 1/true/yes."""
    if allow_clock_control:
        return True
    return os.environ.get(ALLOW_CLOCK_CONTROL_ENV, "").strip().lower() in {"1", "true", "yes"}


# ------------------------------------------------------------------------------------- result types
@dataclass(frozen=True)
class EnergyMeasurement:
    """Time and energy of one measurement window.

    Attributes:
        time_s: elapsed time of the window in seconds (wall time on hardware, virtual time when emulated).
        energy_j: GPU energy used in the window in joules.
    """

    time_s: float
    energy_j: float

    @property
    def average_power_w(self) -> float:
        """Mean power over the window in W (J / s); NaN for a zero-length window."""
        return self.energy_j / self.time_s if self.time_s > 0 else float("nan")


@dataclass(frozen=True)
class ClockLock:
    """What :meth:`GPUClockBackend.locked_clock` applied.

    Attributes:
        requested_hz: the frequency asked for, in Hz.
        target_mhz: the supported clock nearest the request, which was written, in MHz.
        readback_mhz: the clock read back from the GPU right after locking, in MHz.
    """

    requested_hz: float
    target_mhz: float
    readback_mhz: float

    @property
    def applied_hz(self) -> float:
        """The clock read back after locking, in Hz."""
        return self.readback_mhz * 1e6


class EnergyWindow:
    """Handle yielded by :meth:`GPUClockBackend.energy_window`; ``measurement`` is set when the block exits."""

    def __init__(self, name: str):
        self.name = name
        self.measurement: EnergyMeasurement | None = None


# ------------------------------------------------------------------------ restore-on-exit machinery
#: signals whose default action ends the process: while a clock is locked each restores the clocks first, then
#: chains to the handler that was there before (SIGHUP: an ssh session dropping during a clock sweep). SIGKILL
#: cannot be handled: after ``kill -9`` unlock by hand (docs/model.md, "GPU clock and energy backends").
RESTORE_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
                        if hasattr(signal, n))


class _ClockOwner:
    """The one restore owner of a GPU: the state found before the first lock (``original``, backend-specific:
    None = unlocked) and the locks held on it, oldest first (``stack`` of (backend, MHz)). The GPU runs at the
    newest lock; releasing it puts back the one below, or ``original`` when none is left."""

    def __init__(self, original) -> None:
        self.original = original
        self.stack: list[tuple[GPUClockBackend, float]] = []


class _RestoreGuard:
    """Process-wide registry of the clock locks held, one :class:`_ClockOwner` per GPU, plus the signal and atexit
    handlers.

    Handlers are installed when the first lock is taken and removed when the last one is released. A handler
    (:data:`RESTORE_SIGNALS`) restores every held lock, then chains to the handler that was there before: a
    callable is called, ``SIG_IGN`` is honoured, ``SIG_DFL`` re-delivers the signal so the process still dies of it
    (exit status -15 for SIGTERM). A signal whose handler was set from C (``getsignal`` returns None) is left alone.
    Signal handlers can only be set from the main thread; a lock taken from another thread is still restored on
    exit, exception and atexit, and a warning says so.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owners: dict[object, _ClockOwner] = {}
        self._prev: dict[int, object] = {}
        self._atexit_installed = False

    # ---- locks ---------------------------------------------------------------------------------
    def acquire(self, backend: "GPUClockBackend", clock_mhz: float) -> None:
        """Register ``backend``'s lock at ``clock_mhz`` on its GPU's owner (saving the GPU's state first if it is
        the first lock there), then write it. Registered BEFORE the write, so an interrupt right after a successful
        write is still restored; a write the driver refused (GPUBackendError) is unregistered here."""
        with self._lock:
            self._install()
            key = backend._clock_owner_key()
            owner = self._owners.get(key)
            if owner is None:
                owner = _ClockOwner(backend._save_clock_state())
                self._owners[key] = owner
            owner.stack.append((backend, clock_mhz))
            try:
                backend._lock_clock_mhz(clock_mhz)
            except GPUBackendError:  # refused by the driver: nothing changed (the primitive's contract)
                owner.stack.pop()
                if not owner.stack:
                    del self._owners[key]
                self._maybe_uninstall()
                raise
            # any other exception (KeyboardInterrupt after the write succeeded) leaves the lock registered: the
            # caller's release puts back what was there before

    def release(self, backend: "GPUClockBackend", reason: str) -> None:
        """Drop ``backend``'s lock: if it is the one in force, put back the lock below it (another object's on the
        same GPU) or the state found before the first lock. Raises GPUBackendError (with the manual command) if
        the write fails."""
        with self._lock:
            for key, owner in list(self._owners.items()):
                idx = next((i for i, (b, _) in enumerate(owner.stack) if b is backend), None)
                if idx is not None:
                    break
            else:
                self._maybe_uninstall()
                return
            in_force = idx == len(owner.stack) - 1
            owner.stack.pop(idx)
            if not owner.stack:
                del self._owners[key]
            try:
                if in_force:
                    logger.debug("%s: restoring clocks (%s)", backend.name, reason)
                    if owner.stack:
                        backend._lock_clock_mhz(owner.stack[-1][1])
                    else:
                        backend._restore_clock_state(owner.original)
            except Exception as exc:
                raise GPUBackendError(f"{backend.name}: FAILED to restore the GPU clocks ({reason}): {exc}. "
                                      f"{backend._manual_restore_hint(owner.original)}") from exc
            finally:
                self._maybe_uninstall()

    def held(self) -> list["GPUClockBackend"]:
        with self._lock:
            return [b for o in self._owners.values() for b, _ in reversed(o.stack)]

    def restore_all(self, reason: str) -> None:
        """Release every held lock, newest first (so each GPU ends in the state found before its first lock)."""
        for backend in self.held():
            try:
                backend._release_lock(reason=reason)
            except Exception:  # keep restoring the others; the failure is logged
                logger.exception("failed to restore clocks of %r on %s", backend, reason)

    # ---- handlers ------------------------------------------------------------------------------
    def _install(self) -> None:
        if not self._atexit_installed:
            atexit.register(self._on_atexit)
            self._atexit_installed = True
        if self._prev:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("clock locked outside the main thread: no signal handlers installed "
                           "(clocks are still restored on exit, exception and interpreter exit)")
            return
        for sig in RESTORE_SIGNALS:
            prev = signal.getsignal(sig)
            if prev is None:  # set from C: cannot be chained, so leave it
                continue
            signal.signal(sig, self._on_signal)
            self._prev[sig] = prev

    def _maybe_uninstall(self) -> None:
        if self._owners:
            return
        if self._atexit_installed:
            atexit.unregister(self._on_atexit)
            self._atexit_installed = False
        self._uninstall_signals()

    def _uninstall_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # retried by the next release from the main thread
        for sig, prev in list(self._prev.items()):
            # Put the previous handler back only if ours is still the one installed.
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, prev)
            del self._prev[sig]

    def _on_atexit(self) -> None:
        self.restore_all("interpreter exit")

    def _on_signal(self, signum, frame) -> None:
        prev = self._prev.get(signum, signal.SIG_DFL)
        self.restore_all(signal.Signals(signum).name)
        with self._lock:
            self._uninstall_signals()
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_IGN:
            return
        else:  # SIG_DFL: die of the signal as the process would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


_GUARD = _RestoreGuard()


# ----------------------------------------------------------------------------------- the interface
class GPUClockBackend(abc.ABC):
    """Abstract GPU clock control and energy measurement.

    Subclasses implement the primitives ``supported_clocks_mhz``, ``current_clock_mhz``,
    ``_lock_clock_mhz``, ``_restore_clocks`` and ``_read_counters``; this class adds nearest-clock
    selection, the opt-in check, the always-restore context manager and named energy windows.

    Args:
        allow_clock_control: allow ``locked_clock`` to change clocks. Also enabled by the environment
            variable ``SPLITLORA_ALLOW_CLOCK_CONTROL=1``. Backends without real hardware ignore it.

    Sources: NVML https://docs.nvidia.com/deploy/nvml-api/ (clock locking, energy counter); Linux devfreq
    https://www.kernel.org/doc/Documentation/ABI/testing/sysfs-class-devfreq (min_freq/max_freq/cur_freq).
    """

    #: short name used by the factory and in messages
    name: str = "abstract"
    #: whether clock setting needs the opt-in (True for real hardware)
    requires_opt_in: bool = True

    def __init__(self, *, allow_clock_control: bool = False):
        self._allow_clock_control = bool(allow_clock_control)
        self._locked = False
        self._state_lock = threading.RLock()
        self._windows: dict[str, tuple[float, float]] = {}

    # ---- primitives -------------------------------------------------------------------------
    @abc.abstractmethod
    def supported_clocks_mhz(self) -> list[float]:
        """Supported GPU (graphics) clocks in MHz, sorted ascending, without duplicates.

        Raises:
            NotSupportedError, GPUNotAvailableError: the query is unsupported or the GPU is gone.
        """

    @abc.abstractmethod
    def current_clock_mhz(self) -> float:
        """The GPU (graphics) clock now, in MHz.

        Raises:
            NotSupportedError, GPUNotAvailableError: the query is unsupported or the GPU is gone.
        """

    @abc.abstractmethod
    def _lock_clock_mhz(self, clock_mhz: float) -> None:
        """Lock the clock to ``clock_mhz`` (a supported clock). Must leave no partial change on failure."""

    @abc.abstractmethod
    def _restore_clocks(self) -> None:
        """Put the clocks back to unlocked (the driver default)."""

    def _save_clock_state(self):
        """The GPU's clock setting before this package's first lock on it, for :meth:`_restore_clock_state`
        (None = unlocked). Raises GPUBackendError when a setting exists that could not be put back."""
        return None

    def _restore_clock_state(self, state) -> None:
        """Put back a state from :meth:`_save_clock_state` (None: :meth:`_restore_clocks`)."""
        self._restore_clocks()

    def _clock_owner_key(self) -> object:
        """Identifies the GPU: backends with equal keys share one restore owner (this object alone by default)."""
        return ("object", id(self))

    @abc.abstractmethod
    def _read_counters(self) -> tuple[float, float]:
        """Return (time in s, cumulative energy in J) from a monotonic clock and energy counter."""

    # ---- derived behaviour -------------------------------------------------------------------
    @property
    def clock_control_allowed(self) -> bool:
        """True if this backend may change clocks (opt-in given, or no real hardware behind it)."""
        return (not self.requires_opt_in) or clock_control_allowed(self._allow_clock_control)

    @property
    def is_locked(self) -> bool:
        """True while a ``locked_clock`` block holds the clock."""
        return self._locked

    def nearest_supported_clock_mhz(self, freq_hz: float) -> float:
        """The supported clock (MHz) nearest ``freq_hz`` (Hz); ties go to the lower clock.

        Raises:
            ValueError: ``freq_hz`` is not finite and > 0, or lies more than a factor 2 outside the
                supported range (most likely MHz passed where Hz is expected).
        """
        check_positive("freq_hz", freq_hz)
        clocks = self.supported_clocks_mhz()
        if not clocks:
            raise NotSupportedError(f"{self.name}: the GPU reports no supported clocks")
        lo_hz, hi_hz = clocks[0] * 1e6, clocks[-1] * 1e6
        if not (0.5 * lo_hz <= freq_hz <= 2.0 * hi_hz):
            raise InvalidParameterError(f"freq_hz={freq_hz!r} is invalid: must be a frequency in Hz within a factor 2 "
                             f"of the supported range [{lo_hz:.6g}, {hi_hz:.6g}] Hz")
        f_mhz = freq_hz / 1e6
        return min(clocks, key=lambda c: (abs(c - f_mhz), c))

    def _opt_in_message(self) -> str:
        return (f"{self.name}: clock control is off by default, so this backend only reads. To let it lock "
                f"the GPU clock, pass allow_clock_control=True (get_gpu_backend(..., allow_clock_control=True)) "
                f"or set the environment variable {ALLOW_CLOCK_CONTROL_ENV}=1. It then needs the rights to "
                f"change clocks (root or an administrator-granted permission).")

    @contextmanager
    def locked_clock(self, freq_hz: float) -> Iterator[ClockLock]:
        """Lock the GPU clock to the supported clock nearest ``freq_hz`` for the duration of the block.

        The clock is read back after locking (a mismatch is logged as a warning) and ALWAYS restored to what was
        there before (the lock of another backend object on the same GPU, else the state found before the first
        lock): on normal exit, on an exception (also one arriving right after the write succeeded), on SIGTERM,
        SIGHUP, SIGQUIT, SIGUSR1/2 (then the previous handler is chained) and at interpreter exit. SIGKILL cannot be
        handled (docs/model.md gives the command to unlock by hand). Nested locks on the same backend are refused.

        Args:
            freq_hz: requested clock in Hz.

        Yields:
            ClockLock: requested Hz, the target MHz written and the MHz read back.

        Raises:
            ClockControlNotAllowedError: a real backend without the opt-in (nothing is written).
            ClockPermissionError: the driver or OS refused the change.
            NotSupportedError: the GPU does not support clock locking.
            GPUBackendError: already locked, or restoring the clocks failed.
            ValueError: ``freq_hz`` is not a plausible frequency in Hz.
        """
        if not self.clock_control_allowed:
            raise ClockControlNotAllowedError(self._opt_in_message())
        target_mhz = self.nearest_supported_clock_mhz(freq_hz)
        mine = False
        try:
            with self._state_lock:
                if self._locked:
                    raise GPUBackendError(f"{self.name}: the clock is already locked; nested locked_clock is not "
                                          "supported")
                self._locked = mine = True  # from here every exit restores, even right after a successful write
            _GUARD.acquire(self, target_mhz)
            readback_mhz = float(self.current_clock_mhz())
            if abs(readback_mhz - target_mhz) > 0.01 * target_mhz:
                logger.warning("%s: locked the clock to %.1f MHz but read back %.1f MHz",
                               self.name, target_mhz, readback_mhz)
            yield ClockLock(requested_hz=float(freq_hz), target_mhz=float(target_mhz),
                            readback_mhz=readback_mhz)
        finally:
            if mine:
                self._release_lock(reason="end of locked_clock")

    def _release_lock(self, *, reason: str) -> None:
        """Give this backend's lock back to its GPU's restore owner (idempotent): the clock returns to the lock
        below it on the same GPU, or to the state found before the first lock."""
        with self._state_lock:
            if not self._locked:
                return
            self._locked = False
            _GUARD.release(self, reason)

    def _manual_restore_hint(self, state=None) -> str:
        return "Restore them by hand."

    # ---- energy windows ---------------------------------------------------------------------
    def begin_window(self, name: str = "default") -> None:
        """Start the energy window ``name`` (several names may be open at once).

        Raises:
            GPUBackendError: a window with this name is already open.
            NotSupportedError: no energy counter on this GPU.
        """
        if name in self._windows:
            raise GPUBackendError(f"{self.name}: energy window {name!r} is already open")
        self._on_window_open()
        try:
            self._windows[name] = self._read_counters()
        except BaseException:
            self._on_window_close()
            raise

    def end_window(self, name: str = "default") -> EnergyMeasurement:
        """End the energy window ``name``; return its elapsed time (s) and energy (J).

        Raises:
            GPUBackendError: no window with this name is open.
        """
        if name not in self._windows:
            raise GPUBackendError(f"{self.name}: energy window {name!r} was not begun")
        try:
            t1, e1 = self._read_counters()
        finally:
            t0, e0 = self._windows.pop(name)
            self._on_window_close()
        return EnergyMeasurement(time_s=t1 - t0, energy_j=e1 - e0)

    @contextmanager
    def energy_window(self, name: str = "default") -> Iterator[EnergyWindow]:
        """Context-manager form of begin/end_window; the yielded handle's ``measurement`` is set at exit.

        On real GPUs, synchronise the device (``torch.cuda.synchronize()``) before the block ends.
        """
        handle = EnergyWindow(name)
        self.begin_window(name)
        try:
            yield handle
        except BaseException:
            self._cancel_window(name)
            raise
        handle.measurement = self.end_window(name)

    def _cancel_window(self, name: str) -> None:
        """Drop an open window without a result (used when its block raised)."""
        if self._windows.pop(name, None) is not None:
            self._on_window_close()

    def _on_window_open(self) -> None:
        """Hook called before a window's first reading (e.g. start a power sampler)."""

    def _on_window_close(self) -> None:
        """Hook called after a window closes."""

    def close(self) -> None:
        """Release the backend's resources (restores a held lock first)."""
        self._release_lock(reason="close")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} locked={self._locked}>"

"""Emulated GPU: a synthetic clock table, and virtual time and energy from the system model.

Work of ``cycles`` cycles at clock f takes t = cycles / f (s) and uses E = kappa cycles f^2 + P0 t (J); no
hardware is touched, so clock control is always allowed. The default backend in CI.
Source: docs/model.md, "GPU clock and energy backends" and "Server energy".
"""
from __future__ import annotations

import numpy as np

from splitlora._validate import check_order, check_positive
from splitlora.model.system import compute_energy_j, compute_time_s

from .common import EnergyMeasurement, GPUClockBackend


class EmulatedBackend(GPUClockBackend):
    """A GPU that exists only as numbers: clock table f_min..f_max in steps, virtual time and energy.

    Args:
        kappa: effective switched capacitance in W/Hz^3 (dynamic power = kappa * f^3).
        f_min_hz: lowest supported clock in Hz.
        f_max_hz: highest supported clock in Hz (always in the table, even if not on the step grid).
        step_hz: spacing of the clock table in Hz.
        static_power_w: static power P0 in W charged for busy time (default 0).
        default_clock_hz: clock when not locked, in Hz (snapped to the table; default f_max, like boost).
        allow_clock_control: accepted for a uniform factory signature; ignored (always allowed).

    Raises:
        ValueError: a non-positive or non-finite argument, or f_min_hz > f_max_hz.
    """

    name = "emulated"
    requires_opt_in = False

    def __init__(self, *, kappa: float, f_min_hz: float, f_max_hz: float, step_hz: float,
                 static_power_w: float = 0.0, default_clock_hz: float | None = None,
                 allow_clock_control: bool = True):
        super().__init__(allow_clock_control=allow_clock_control)
        check_positive("kappa", kappa)
        check_positive("f_min_hz", f_min_hz)
        check_positive("f_max_hz", f_max_hz)
        check_order("f_min_hz", f_min_hz, "f_max_hz", f_max_hz)
        check_positive("step_hz", step_hz)
        check_positive("static_power_w", static_power_w, allow_zero=True)
        self.kappa = float(kappa)
        self.static_power_w = float(static_power_w)
        n = int(np.floor((f_max_hz - f_min_hz) / step_hz + 1e-9))
        table_hz = [f_min_hz + i * step_hz for i in range(n + 1)]
        if f_max_hz - table_hz[-1] > 1e-6 * step_hz:
            table_hz.append(f_max_hz)
        self._clocks_mhz = sorted({round(f / 1e6, 6) for f in table_hz})
        self._default_mhz = (self._clocks_mhz[-1] if default_clock_hz is None
                             else self.nearest_supported_clock_mhz(default_clock_hz))
        self._clock_mhz = self._default_mhz
        self.virtual_time_s = 0.0
        self.energy_j = 0.0

    # ---- interface ---------------------------------------------------------------------------
    def supported_clocks_mhz(self) -> list[float]:
        """The synthetic clock table in MHz, ascending."""
        return list(self._clocks_mhz)

    def current_clock_mhz(self) -> float:
        """The emulated clock now, in MHz (the locked clock inside ``locked_clock``, else the default)."""
        return self._clock_mhz

    def _lock_clock_mhz(self, clock_mhz: float) -> None:
        self._clock_mhz = float(clock_mhz)

    def _restore_clocks(self) -> None:
        self._clock_mhz = self._default_mhz

    def _read_counters(self) -> tuple[float, float]:
        return self.virtual_time_s, self.energy_j

    # ---- the workload ------------------------------------------------------------------------
    def predict(self, cycles: float, clock_hz: float) -> EnergyMeasurement:
        """Time (s) and energy (J) of ``cycles`` cycles at ``clock_hz`` Hz: t = cycles/f,
        E = kappa * cycles * f^2 + P0 * t. Pure; advances nothing.

        Raises:
            ValueError: ``cycles`` < 0 or ``clock_hz`` <= 0.
        """
        check_positive("cycles", cycles, allow_zero=True)
        check_positive("clock_hz", clock_hz)
        return EnergyMeasurement(time_s=float(compute_time_s(cycles, clock_hz)),
                                 energy_j=float(compute_energy_j(cycles, clock_hz, self.kappa, self.static_power_w)))

    def run_cycles(self, cycles: float) -> EnergyMeasurement:
        """Run ``cycles`` GPU cycles at the current clock: advance virtual time and energy; return both.

        Raises:
            ValueError: ``cycles`` < 0 or not finite.
        """
        m = self.predict(cycles, self._clock_mhz * 1e6)
        self.virtual_time_s += m.time_s
        self.energy_j += m.energy_j
        return m

    account = run_cycles

    def idle(self, time_s: float) -> EnergyMeasurement:
        """Let ``time_s`` seconds of virtual time pass with no work (charges no energy: P0 is busy-only).

        Raises:
            ValueError: ``time_s`` < 0 or not finite.
        """
        check_positive("time_s", time_s, allow_zero=True)
        self.virtual_time_s += time_s
        return EnergyMeasurement(time_s=float(time_s), energy_j=0.0)

"""Fit the server energy model E = kappa f^3 t + P0 t to (clock, time, energy) measurements.

:func:`fit_energy_model` fits kappa (W/Hz^3) and P0 (W) by non-negative linear least squares;
:func:`sweep_clocks` produces the samples by running a workload at each clock through a GPU backend
(:mod:`splitlora.gpu`). Source: docs/model.md, "Server energy" ("Calibration").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy.optimize import lsq_linear

from splitlora._validate import check_positive
from splitlora.errors import InvalidParameterError
from splitlora.gpu.common import GPUClockBackend


@dataclass(frozen=True)
class ClockSample:
    """One measurement of a workload at a locked clock.

    Attributes:
        clock_hz: clock the GPU ran at (read back after locking), Hz.
        time_s: elapsed time of the workload, s.
        energy_j: GPU energy of the workload, J.
        requested_hz: clock asked for, Hz (NaN when unknown).
    """

    clock_hz: float
    time_s: float
    energy_j: float
    requested_hz: float = float("nan")

    @property
    def cycles(self) -> float:
        """Effective cycles f * t."""
        return self.clock_hz * self.time_s


@dataclass(frozen=True)
class EnergyFit:
    """Least-squares fit of E = kappa * f^3 * t + P0 * t.

    Attributes:
        kappa: effective switched capacitance, W/Hz^3.
        static_power_w: static power P0, W (0 when not fitted).
        fit_static_power: whether P0 was a free parameter.
        n_samples: number of samples used.
        residuals_j: measured minus fitted energy per sample, J.
        rmse_j: root-mean-square residual, J.
        relative_rmse: rmse_j divided by the mean measured energy.
        r_squared: coefficient of determination of the energy fit.
    """

    kappa: float
    static_power_w: float
    fit_static_power: bool
    n_samples: int
    residuals_j: tuple[float, ...]
    rmse_j: float
    relative_rmse: float
    r_squared: float

    def predict_energy_j(self, clock_hz, time_s):
        """Energy in J for clock(s) in Hz and time(s) in s: kappa f^3 t + P0 t."""
        f = np.asarray(clock_hz, dtype=float)
        t = np.asarray(time_s, dtype=float)
        return self.kappa * f ** 3 * t + self.static_power_w * t

    def power_w(self, clock_hz):
        """Busy power in W at clock(s) in Hz: kappa f^3 + P0."""
        return self.kappa * np.asarray(clock_hz, dtype=float) ** 3 + self.static_power_w


def fit_energy_model(samples: Iterable[ClockSample] | None = None, *, clocks_hz: Sequence[float] | None = None,
                     times_s: Sequence[float] | None = None, energies_j: Sequence[float] | None = None,
                     fit_static_power: bool = True) -> EnergyFit:
    """Fit kappa (W/Hz^3) and optionally P0 (W) to samples by non-negative linear least squares.

    Give either ``samples`` (:class:`ClockSample` objects) or the three arrays ``clocks_hz`` (Hz),
    ``times_s`` (s) and ``energies_j`` (J).

    Raises:
        ValueError: missing/mismatched inputs, non-positive clocks or times, negative energies, or fewer
            samples than parameters.
    """
    if samples is not None:
        if clocks_hz is not None or times_s is not None or energies_j is not None:
            raise InvalidParameterError("samples is invalid together with clocks_hz/times_s/energies_j: give one form")
        samples = list(samples)
        f = np.array([s.clock_hz for s in samples], dtype=float)
        t = np.array([s.time_s for s in samples], dtype=float)
        e = np.array([s.energy_j for s in samples], dtype=float)
    else:
        if clocks_hz is None or times_s is None or energies_j is None:
            raise InvalidParameterError("samples=None is invalid: must give samples, or clocks_hz, times_s and energies_j")
        f, t, e = (np.asarray(x, dtype=float).ravel() for x in (clocks_hz, times_s, energies_j))
        if not (f.shape == t.shape == e.shape):
            raise InvalidParameterError(f"clocks_hz/times_s/energies_j lengths {f.size}/{t.size}/{e.size} are invalid: "
                             "must be equal")
    check_positive("clocks_hz", f)
    check_positive("times_s", t)
    check_positive("energies_j", e, allow_zero=True)
    n_params = 2 if fit_static_power else 1
    if f.size < n_params:
        raise InvalidParameterError(f"number of samples={f.size} is invalid: must be >= {n_params}")
    cols = [f ** 3 * t] + ([t] if fit_static_power else [])
    A = np.column_stack(cols)
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0] = 1.0
    sol = lsq_linear(A / scale, e, bounds=(0.0, np.inf), method="bvls")
    params = sol.x / scale
    kappa = float(params[0])
    p0 = float(params[1]) if fit_static_power else 0.0
    fitted = A @ params
    resid = e - fitted
    ss_res = float(resid @ resid)
    ss_tot = float(((e - e.mean()) ** 2).sum())
    rmse = float(np.sqrt(ss_res / e.size))
    return EnergyFit(kappa=kappa, static_power_w=p0, fit_static_power=fit_static_power, n_samples=int(e.size),
                     residuals_j=tuple(float(r) for r in resid), rmse_j=rmse,
                     relative_rmse=rmse / float(e.mean()) if e.mean() > 0 else float("nan"),
                     r_squared=1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"))


def sweep_clocks(backend: GPUClockBackend, workload: Callable[[], object], clocks_hz: Iterable[float], *,
                 repeats: int = 1) -> list[ClockSample]:
    """Run ``workload()`` at each clock in ``clocks_hz`` (Hz) through ``backend``; return the samples.

    Each run is ``with backend.locked_clock(f): begin_window; workload(); end_window``; the sample's
    ``clock_hz`` is the clock read back after locking. The workload must block until the GPU is done
    (e.g. end with ``torch.cuda.synchronize()``); for the emulated backend it calls ``run_cycles``.

    Raises:
        ClockControlNotAllowedError, ClockPermissionError, NotSupportedError: from the backend.
        ValueError: ``repeats`` < 1.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidParameterError(f"repeats={repeats!r} is invalid: must be an integer >= 1")
    samples = []
    for f in clocks_hz:
        with backend.locked_clock(f) as lock:
            for _ in range(repeats):
                with backend.energy_window("splitlora-calibration") as w:
                    workload()
                m = w.measurement
                samples.append(ClockSample(clock_hz=lock.applied_hz, time_s=m.time_s, energy_j=m.energy_j,
                                           requested_hz=float(f)))
    return samples

"""CARD (Cut lAyer and computing Resource Decision) and the exhaustive joint search it is checked against.

Per device-round CARD minimises U(c, f) in two layers: the closed-form server clock f* (U is convex in f), then
the feasible cut layer with the smallest U(c, f*); O(L) per device-round, for the sequential and the pipelined
schedule. Source: docs/model.md, "CARD" and "Pipelined schedule".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.system import CostModel, check_weight, compute_time_s, device_round_inputs

DEFAULT_CHUNK = 1 << 15


@dataclass(frozen=True)
class Decision:
    """Decisions for K device-rounds (one entry per device and round), all arrays of shape (K,).

    Attributes:
        cut_layer: chosen cut layer c in 0..L (int); -1 where no cut layer fits in device memory.
        frequency_hz: server GPU clock (Hz); 0.0 where c = L (server idle); NaN where infeasible.
        delay_s: round delay T (s); energy_j: server energy E (J); objective: U (-). NaN where infeasible.
        feasible: whether a decision exists (bool).
    """

    cut_layer: np.ndarray
    frequency_hz: np.ndarray
    delay_s: np.ndarray
    energy_j: np.ndarray
    objective: np.ndarray
    feasible: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """One row per device-round with the columns above."""
        return pd.DataFrame({k: getattr(self, k) for k in
                             ("cut_layer", "frequency_hz", "delay_s", "energy_j", "objective", "feasible")})

    @classmethod
    def masked(cls, feasible, cut_layer, frequency_hz, delay_s, energy_j, objective) -> "Decision":
        """Decisions where ``feasible`` (K,) holds; elsewhere cut -1 and NaN values. The clock is reported as 0.0
        where the cut is L (``frequency_hz`` must already say so)."""
        nan = np.nan
        return cls(np.where(feasible, cut_layer, -1), np.where(feasible, frequency_hz, nan),
                   np.where(feasible, delay_s, nan), np.where(feasible, energy_j, nan),
                   np.where(feasible, objective, nan), np.asarray(feasible))

    @staticmethod
    def concat(parts: list["Decision"]) -> "Decision":
        """Concatenate decisions of consecutive chunks."""
        return Decision(*(np.concatenate([getattr(p, k) for p in parts]) for k in
                          ("cut_layer", "frequency_hz", "delay_s", "energy_j", "objective", "feasible")))


def optimal_frequency_hz(model: CostModel, t_ref_s, e_ref_j, w: float, *, discrete_clocks: bool = False,
                         cut_layer=0) -> np.ndarray:
    """Closed-form server clock minimising U(f) for an active cut (c < L), shape (K,) (Hz).

    Args:
        model: the cost model; t_ref_s, e_ref_j: normalisers (K,) (s, J); w: delay weight in [0, 1];
        discrete_clocks: pick from ``model.clocks_hz`` (the better of the two clocks bracketing f*);
        cut_layer: (K,) or scalar c < L; only used by the discrete comparison (f* itself does not depend on c).
    Raises:
        ValueError: w outside [0, 1].
    """
    check_weight(w)
    t_ref = np.asarray(t_ref_s, dtype=float)
    e_ref = np.asarray(e_ref_j, dtype=float)
    num = w / t_ref + (1.0 - w) * model.static_power_w / e_ref          # a / (I C_s)
    den = 2.0 * (1.0 - w) * model.kappa / e_ref                         # 2b / (I C_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(den > 0, np.cbrt(num / den), np.inf)
    f = np.clip(np.where(np.isnan(f), model.f_min_hz, f), model.f_min_hz, model.f_max_hz)
    if not discrete_clocks:
        return f
    table = model.clocks_hz
    hi = np.clip(np.searchsorted(table, f, side="left"), 0, len(table) - 1)
    lo = np.clip(hi - 1, 0, len(table) - 1)
    c = np.broadcast_to(np.asarray(cut_layer), f.shape)
    def u(fq):  # the f-dependent part of U (the rest is the same for both candidates)
        return (w * model.server_delay_s(c, fq) / t_ref + (1 - w) * model.server_energy_j(c, fq) / e_ref)
    f_lo, f_hi = table[lo], table[hi]
    return np.where(u(f_lo) <= u(f_hi), f_lo, f_hi)


def _pipelined_clock_hz(model: CostModel, t_d, t_l, t_h, cycles, t_ref, e_ref, w: float, discrete_clocks: bool):
    """Best server clock of the pipelined schedule for per-mini-batch stage times and cycles (any common shape).

    U(f) is convex on [f_min, f_max] (a max of convex delays plus a convex energy), with two pieces: f <= f_k = C /
    max(T_d, T_l) (the server sets the pace) and f >= f_k (the device or link does). On each the stationary point is
    (a / 2b)^(1/3), with a / 2b independent of the cycles C (taken once per device-round): the left root r_hi if it
    is below f_k, else the right one r_lo clipped to [f_k, f_max]."""
    I, kappa, P0 = model.iterations, model.kappa, model.static_power_w  # the derivative's coefficients
    C = np.asarray(cycles, dtype=float)
    t_ref = np.asarray(t_ref, dtype=float)
    e_ref = np.asarray(e_ref, dtype=float)
    m = np.maximum(t_d, t_l)
    den = 2.0 * (1.0 - w) * kappa / e_ref                              # 2b / (I C)
    with np.errstate(divide="ignore", invalid="ignore"):
        f_k = np.clip(np.where(m > 0, C / m, np.inf), model.f_min_hz, model.f_max_hz)
        def root(num):  # (a / 2b)^(1/3): f_min where undefined, inf where b = 0
            r = np.where(den > 0, np.cbrt(num / den), np.inf)
            return np.where(np.isnan(r), model.f_min_hz, r)
        r_hi = root(w / t_ref + (1.0 - w) * P0 / e_ref)                # f <= f_k: the server sets the pace
        r_lo = root(w / (I * t_ref) + (1.0 - w) * P0 / e_ref)          # f >= f_k: the device or link does
    f = np.where(r_hi <= f_k, np.maximum(r_hi, model.f_min_hz), np.minimum(np.maximum(r_lo, f_k), model.f_max_hz))
    f = np.where(C > 0, f, model.f_min_hz)
    if not discrete_clocks:
        return f

    def u(fq):
        T = model.round_delay_s(t_d, t_l, t_h, compute_time_s(C, fq))
        return w * T / t_ref + (1.0 - w) * model.energy_j(I * C, fq) / e_ref

    table = model.clocks_hz
    hi = np.clip(np.searchsorted(table, f, side="left"), 0, len(table) - 1)
    lo = np.clip(hi - 1, 0, len(table) - 1)
    return np.where(u(table[lo]) <= u(table[hi]), table[lo], table[hi])


def best_clock_hz(model: CostModel, cut_layer, device_flops_per_s, rate_up_bps, rate_down_bps, w: float, *,
                  discrete_clocks: bool = False) -> np.ndarray:
    """CARD's server clock for given cut layers (K,), for either schedule (Hz), shape (K,).

    Sequential: :func:`optimal_frequency_hz`. Pipelined: the piecewise closed form of docs/model.md, "Pipelined
    schedule".
    The value is meaningless where c = L (server idle).
    Raises: ValueError for w outside [0, 1], a cut layer outside 0..L, bad compute or rates.
    """
    check_weight(w)
    _per_device_schedule(model)
    P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
    c = np.broadcast_to(np.asarray(cut_layer).reshape(-1), P.shape)
    V.check_int_range("cut_layer", c, 0, model.n_cuts)
    c = c.astype(np.int64)
    t_ref, e_ref = model.references(P, Ru, Rd)
    if model.schedule == "sequential":
        return optimal_frequency_hz(model, t_ref, e_ref, w, discrete_clocks=discrete_clocks, cut_layer=c)
    rows = np.arange(len(c))
    t_d, t_l, t_h = (a[rows, c] for a in model.stage_times_s(P, Ru, Rd))
    return _pipelined_clock_hz(model, t_d, t_l, t_h, model.server_cycles[c], t_ref, e_ref, w, discrete_clocks)


def _check_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, chunk, w) -> None:
    """The inputs of :func:`card` / :func:`exhaustive_search`: per-device-round numbers (not strings), at least one
    device-round, memory >= 0; ``chunk`` an integer >= 1; ``w`` one number. Raises InvalidParameterError naming
    the argument."""
    if np.ndim(w) != 0:
        raise V.InvalidParameterError(f"w={w!r} is invalid: must be one number in [0, 1]")
    V.check_int_range("chunk", chunk, 1, 10**9)
    for name, v in (("device_flops_per_s", device_flops_per_s), ("rate_up_bps", rate_up_bps),
                    ("rate_down_bps", rate_down_bps), ("memory_bytes", memory_bytes)):
        V.check_number(name, v)
        if np.size(v) == 0:
            raise V.InvalidParameterError(f"{name}=[] is invalid: must hold at least one device-round")
    V.check_positive("memory_bytes", memory_bytes, allow_zero=True)


def card(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float, *,
         discrete_clocks: bool = False, chunk: int = DEFAULT_CHUNK) -> Decision:
    """Run CARD for K device-rounds at once.

    Args:
        model: :class:`splitlora.model.system.CostModel` of the model, workload and server.
        device_flops_per_s: P_d of each device-round, shape (K,) (FLOP/s).
        rate_up_bps, rate_down_bps: link rates of each device-round, (K,) (bit/s).
        memory_bytes: device training memory M_d, (K,) (byte).
        w: weight of delay against energy in [0, 1].
        discrete_clocks: choose the clock from the supported-clock table instead of [f_min, f_max].
        chunk: device-rounds processed per vectorised block (memory ~ 60 x chunk x (L+1) bytes).
    Returns:
        :class:`Decision` with arrays of shape (K,).
    Raises:
        ValueError: w outside [0, 1] or not a number, non-positive or NaN compute, rates or memory, empty inputs,
            chunk < 1.
    """
    check_weight(w)
    _per_device_schedule(model)
    _check_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, chunk, w)
    P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
    M = np.broadcast_to(np.asarray(memory_bytes, dtype=float).reshape(-1), P.shape)
    parts = [_card_block(model, P[i:i + chunk], Ru[i:i + chunk], Rd[i:i + chunk], M[i:i + chunk], w, discrete_clocks)
             for i in range(0, P.shape[0], chunk)]
    return Decision.concat(parts)


def _per_device_schedule(model: CostModel) -> None:
    """Raise unless the schedule solves each device-round alone (the parallel ones couple a round's devices)."""
    if model.parallel:
        raise InvalidParameterError(f"schedule={model.schedule!r} is invalid here: card and exhaustive_search solve "
                                    "device-rounds alone; use splitlora.model.parallel.card_rounds / exhaustive_rounds")


def _card_block(model, P, Ru, Rd, M, w, discrete_clocks):
    if model.schedule != "sequential":
        return _card_block_pipelined(model, P, Ru, Rd, M, w, discrete_clocks)
    L = model.n_cuts
    fixed = model.fixed_delay_s(P, Ru, Rd)                               # (k, L+1)
    cyc = model.iterations * model.server_cycles                         # (L+1,)
    fmax = model.f_max_hz
    t_ref = fixed[:, 0] + cyc[0] / fmax
    e_ref = np.full(len(P), model.energy_j(cyc[0], fmax))
    f = optimal_frequency_hz(model, t_ref, e_ref, w, discrete_clocks=discrete_clocks)  # (k,), same for all c < L
    fc = f[:, None]
    u = (w * (fixed + cyc[None, :] / fc) / t_ref[:, None]
         + (1.0 - w) * model.energy_j(cyc[None, :], fc) / e_ref[:, None])
    ok = model.feasible(M)
    u = np.where(ok, u, np.inf)
    c = np.argmin(u, axis=1)
    rows = np.arange(len(c))
    feasible = ok[rows, c]
    u_best = u[rows, c]
    delay = fixed[rows, c] + cyc[c] / f
    energy = model.energy_j(cyc[c], f)
    return Decision.masked(feasible, c, np.where(c == L, 0.0, f), delay, energy, u_best)


def _card_block_pipelined(model, P, Ru, Rd, M, w, discrete_clocks):
    L = model.n_cuts
    t_d, t_l, t_h = model.stage_times_s(P, Ru, Rd)                      # (k, L+1) each
    fmax = model.f_max_hz  # the references (as CostModel.references, from the stage times already at hand)
    t_ref = model.round_delay_s(t_d[:, :1], t_l[:, :1], t_h[:, :1], model.server_time_s(0, fmax))
    e_ref = np.full(t_ref.shape, float(model.server_energy_j(0, fmax)))
    C = model.server_cycles

    def cost(rows, cols, discrete):  # clock, delay, energy, U of the cuts at (rows, cols), index arrays
        t = (t_d[rows, cols], t_l[rows, cols], t_h[rows, cols])
        f = _pipelined_clock_hz(model, *t, C[cols], t_ref[rows, 0], e_ref[rows, 0], w, discrete)
        T = model.round_delay_s(*t, compute_time_s(C[cols], f))
        E = model.energy_j(model.iterations * C[cols], f)
        return f, T, E, w * T / t_ref[rows, 0] + (1.0 - w) * E / e_ref[rows, 0]

    ok = model.feasible(M)
    f = _pipelined_clock_hz(model, t_d, t_l, t_h, C, t_ref, e_ref, w, False)
    u = np.where(ok, w * model.round_delay_s(t_d, t_l, t_h, compute_time_s(C, f)) / t_ref
                 + (1.0 - w) * model.energy_j(model.iterations * C, f) / e_ref, np.inf)
    rows = np.arange(len(P))
    if discrete_clocks and np.all((model.clocks_hz >= model.f_min_hz) & (model.clocks_hz <= model.f_max_hz)):
        # a table clock is never better than the best clock of [f_min, f_max]: the discrete clock is needed only
        # for the cuts whose continuous U is within the discrete U of the continuous optimum
        bound = cost(rows, np.argmin(u, axis=1), True)[3]
        r, k = np.nonzero(ok & (u <= bound[:, None] * (1 + 1e-12)))
        u = np.full(u.shape, np.inf)
        u[r, k] = cost(r, k, True)[3]
    elif discrete_clocks:
        u = np.where(ok, cost(*np.indices(u.shape), True)[3], np.inf)
    c = np.argmin(u, axis=1)
    f, T, E, u_best = cost(rows, c, discrete_clocks)
    return Decision.masked(ok[rows, c], c, np.where(c == L, 0.0, f), T, E, u_best)


def exhaustive_search(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float,
                      clocks_hz=None, *, chunk: int = 256) -> Decision:
    """Joint brute force over every feasible cut layer and every clock of a grid (the benchmark CARD must match).

    Args:
        as :func:`card`; clocks_hz: the frequency grid (Hz), default ``model.clocks_hz`` (the supported-clock
        table). Nothing from CARD's closed form is used: U is evaluated on the whole (c, f) grid.
    Returns:
        :class:`Decision`, arrays of shape (K,).
    Raises:
        ValueError: as :func:`card`; a clock of ``clocks_hz`` not finite and > 0, or none.
    """
    check_weight(w)
    _per_device_schedule(model)
    _check_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, chunk, w)
    if clocks_hz is not None:
        V.check_positive("clocks_hz", clocks_hz)
        if np.size(clocks_hz) == 0:
            raise V.InvalidParameterError("clocks_hz=[] is invalid: must hold at least one clock > 0 (Hz)")
    P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
    M = np.broadcast_to(np.asarray(memory_bytes, dtype=float).reshape(-1), P.shape)
    grid = np.asarray(model.clocks_hz if clocks_hz is None else clocks_hz, dtype=float).reshape(-1)
    L = model.n_cuts
    parts = []
    for i in range(0, P.shape[0], chunk):
        p, ru, rd, m = P[i:i + chunk], Ru[i:i + chunk], Rd[i:i + chunk], M[i:i + chunk]
        t_ref, e_ref = model.references(p, ru, rd)
        t_d, t_l, t_h = (a[:, :, None] for a in model.stage_times_s(p, ru, rd))
        cuts = np.arange(L + 1)
        t_s = model.server_time_s(cuts[:, None], grid[None, :])[None]                    # (1, L+1, F)
        T = model.round_delay_s(t_d, t_l, t_h, t_s)                                      # (k, L+1, F)
        E = np.broadcast_to(model.server_energy_j(cuts[:, None], grid[None, :])[None], T.shape)
        U = w * T / t_ref[:, None, None] + (1 - w) * E / e_ref[:, None, None]
        U = np.where(model.feasible(m)[:, :, None], U, np.inf)
        flat = U.reshape(len(p), -1).argmin(1)
        c, j = np.divmod(flat, len(grid))
        rows = np.arange(len(p))
        feasible = np.isfinite(U[rows, c, j])
        parts.append(Decision.masked(feasible, c, np.where(c == L, 0.0, grid[j]), T[rows, c, j], E[rows, c, j],
                                     U[rows, c, j]))
    return Decision.concat(parts)

"""CARD for the parallel schedules: every device's cut layer and its share of the server clock, jointly per round.

Devices of a round train at the same time; the server's clock is divided into shares f_m with sum f_m <= f_max
(the coupling); the round ends when the last device finishes. For fixed cuts the allocation is convex in the
round deadline tau and solved by bisection on its KKT condition; the cuts are found by coordinate descent over
devices, each step exact over one device's cut layers. Source: docs/model.md, "Parallel schedule".
"""
from __future__ import annotations

from itertools import product

import numpy as np

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.card import Decision, card, exhaustive_search
from splitlora.model.system import CostModel, check_weight

_BISECTIONS = 64


def _round_inputs(model: CostModel, P, Ru, Rd, M):
    """(N, M) float arrays, checked (FLOP/s, bit/s, bit/s, byte); the schedule must be a parallel one."""
    if not model.parallel:
        raise InvalidParameterError(f"schedule={model.schedule!r} is invalid here: needs 'parallel' or "
                                    "'parallel-pipelined' (use splitlora.model.card.card for per-device schedules)")
    if model.static_power_w != 0:
        raise InvalidParameterError(f"static_power_w={model.static_power_w!r} is invalid for the parallel schedules: "
                                    "must be 0 (docs/model.md \"Parallel schedule\")")
    P = np.asarray(P, dtype=float)
    if P.ndim != 2:
        raise InvalidParameterError(f"device_flops_per_s has shape {P.shape}: must be (rounds, devices)")
    out = [np.broadcast_to(np.asarray(a, dtype=float), P.shape) for a in (P, Ru, Rd, M)]
    for name, a in zip(("device_flops_per_s", "rate_up_bps", "rate_down_bps", "memory_bytes"), out):
        V.check_positive(name, a)
    return out


def _stages(model: CostModel, P, Ru, Rd):
    """Per-cut stage times of every device-round, each (N, M, L+1) (s)."""
    shape = P.shape
    t_d, t_l, t_h = model.stage_times_s(P.reshape(-1), Ru.reshape(-1), Rd.reshape(-1))
    return tuple(a.reshape(shape + (model.n_cuts + 1,)) for a in (t_d, t_l, t_h))


def _need_hz(model: CostModel, t_d, t_l, t_h, cycles, tau):
    """Smallest clock share with which a device finishes by ``tau`` (Hz), broadcasting; inf if none does, 0 where
    the server has no work (device-only) and the device alone finishes in time. Inverse of
    :meth:`CostModel.round_delay_s` in T_s."""
    I = model.iterations
    C = np.asarray(cycles, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if model.pipelined:
            A = t_d + t_l + t_h
            m = np.maximum(t_d, t_l)
            server_bound = tau >= A + I * m
            slack = np.where(server_bound, (tau - A) / I, tau - A - (I - 1) * m)
        else:
            slack = (tau - I * (t_d + t_l) - t_h) / I
        need = np.where(slack > 0, C / slack, np.inf)
    idle_ok = (C == 0) & (slack >= 0)
    return np.where(C == 0, np.where(idle_ok, 0.0, np.inf), need)


def allocate(model: CostModel, cut_layer, t_d, t_l, t_h, t_ref, e_ref, w: float, *, discrete_clocks: bool = False):
    """Optimal clock shares for fixed cut layers (the lower layer of parallel CARD), vectorised over rounds.

    Minimises w max_m T_m / T_ref + (1 - w) sum_m E_m / E_ref over shares f_m > 0 with sum f_m <= f_max (shares
    in multiples of the clock-table step with ``discrete_clocks``). Continuous: for a deadline tau each device
    needs f_m(tau) (:func:`_need_hz`), and U(tau) is convex; tau* is the smallest tau with sum f_m(tau) <= f_max,
    f_m <= f_max and dU/dtau = w / T_ref - (1 - w) / E_ref sum_m 2 kappa (I / k_m) f_m^3 >= 0 (k_m = I where the
    server paces the device, 1 where the device or link does), found by bisection. Discrete: the best of the
    deadlines T_m(k step) over every device m and level k (exact).

    Args:
        cut_layer: (N, M) ints; t_d, t_l, t_h: the chosen cuts' stage times, (N, M) each (s);
        t_ref, e_ref: (N,) normalisers; w: delay weight.
    Returns:
        (f_hz (N, M) shares, 0 where c = L; objective (N,), inf where no allocation is feasible).
    """
    c = np.asarray(cut_layer)
    C = model.server_cycles[c]
    I, kappa, F = model.iterations, model.kappa, model.f_max_hz
    t_ref = np.asarray(t_ref, dtype=float)[:, None]
    e_ref = np.asarray(e_ref, dtype=float)[:, None]

    def cost(f):
        T = model.round_delay_s(t_d, t_l, t_h, np.where(C > 0, C / np.where(f > 0, f, 1.0), 0.0)).max(-1)
        E = (I * kappa * C * f ** 2).sum(-1)
        return w * T / t_ref[:, 0] + (1 - w) * E / e_ref[:, 0]

    if discrete_clocks:
        step = float(model.clocks_hz[1] - model.clocks_hz[0]) if len(model.clocks_hz) > 1 else F
        levels = step * np.arange(1, int(np.floor(F / step + 1e-9)) + 1)                  # (K,)
        cand = model.round_delay_s(t_d[..., None], t_l[..., None], t_h[..., None],
                                   np.where(C[..., None] > 0, C[..., None] / levels, 0.0))  # (N, M, K)
        cand = cand.reshape(c.shape[0], -1)                                                  # (N, M K)
        need = _need_hz(model, t_d[:, :, None], t_l[:, :, None], t_h[:, :, None], C[:, :, None],
                        cand[:, None, :] * (1 + 1e-12))                                      # (N, M, MK)
        f = np.ceil(np.round(need / step, 9)) * step
        f = np.where(need > 0, np.maximum(f, step), 0.0)
        ok = np.all(f <= F * (1 + 1e-12), axis=1) & (f.sum(1) <= F * (1 + 1e-9))
        fs = np.where(np.isfinite(f), f, 0.0)
        T = model.round_delay_s(t_d[..., None], t_l[..., None], t_h[..., None],
                                np.where(C[..., None] > 0, C[..., None] / np.where(fs > 0, fs, 1.0), 0.0)).max(1)
        E = (I * kappa * C[..., None] * fs ** 2).sum(1)
        U = np.where(ok, w * T / t_ref + (1 - w) * E / e_ref, np.inf)                       # (N, MK)
        j = U.argmin(1)
        rows = np.arange(c.shape[0])
        return np.where(c < model.n_cuts, fs[rows, :, j], 0.0), U[rows, j]

    k = np.full(C.shape, float(I))
    lo = model.round_delay_s(t_d, t_l, t_h, np.where(C > 0, C / F, 0.0)).max(-1)            # every device at f_max
    hi = np.maximum(lo, 1.0) * 1e9
    for _ in range(_BISECTIONS):
        tau = np.sqrt(lo * hi) if np.all(lo > 0) else 0.5 * (lo + hi)
        need = _need_hz(model, t_d, t_l, t_h, C, tau[:, None])
        if model.pipelined:
            A, m = t_d + t_l + t_h, np.maximum(t_d, t_l)
            k = np.where(tau[:, None] >= A + I * m, float(I), 1.0)
        feasible = np.all(need <= F, axis=-1) & (need.sum(-1) <= F)
        slope = w / t_ref[:, 0] - (1 - w) / e_ref[:, 0] * (2 * kappa * (I / k) * np.where(np.isfinite(need), need, 0.0) ** 3).sum(-1)
        right = feasible & (slope >= 0)
        hi = np.where(right, tau, hi)
        lo = np.where(right, lo, tau)
    f = _need_hz(model, t_d, t_l, t_h, C, hi[:, None])
    f = np.where(C > 0, np.minimum(f, F), 0.0)
    total = f.sum(-1)
    f = f * np.where(total > F, F / np.where(total > F, total, 1.0), 1.0)[:, None]          # rounding guard
    feasible = np.isfinite(hi) & np.all(np.isfinite(_need_hz(model, t_d, t_l, t_h, C, hi[:, None])), axis=-1)
    return f, np.where(feasible, cost(f), np.inf)


def card_parallel(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float, *,
                  discrete_clocks: bool = False, max_sweeps: int = 8) -> Decision:
    """CARD for the parallel schedules: each round's cut layers and clock shares (docs/model.md "Parallel schedule").

    Upper layer: coordinate descent over the devices of a round from three starts (every device server-only, every
    device at its largest cut that fits, every device at its best cut with an equal share); each step tries all
    cut layers of one device with the others fixed, each with its optimal allocation (:func:`allocate`), and keeps
    the best; sweeps stop when no device changes. Checked against :func:`exhaustive_parallel` (tests/model).

    Args:
        model: a :class:`CostModel` with schedule "parallel" or "parallel-pipelined" and static_power_w = 0.
        device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes: (N, M) per round and device (FLOP/s, bit/s,
            byte); w: delay weight in (0, 1]; discrete_clocks: shares in multiples of the clock-table step.
    Returns:
        :class:`Decision` with arrays of shape (N, M): cut layers, shares (Hz, 0 where c = L), each device's finish
        time (s) and server energy (J); ``objective`` is the round's U (the same for its devices); infeasible
        rounds (a device with no cut that fits) have cut -1 and NaN.
    Raises:
        InvalidParameterError: a per-device schedule, P0 > 0, w outside (0, 1], bad shapes or inputs.
    """
    check_weight(w)
    if w <= 0:
        raise InvalidParameterError(f"w={w!r} is invalid for the parallel schedules: must be in (0, 1] (at w = 0 the "
                                    "energy falls toward 0 as the shares shrink: no optimum)")
    P, Ru, Rd, Mem = _round_inputs(model, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes)
    N, Md = P.shape
    L = model.n_cuts
    t_d, t_l, t_h = _stages(model, P, Ru, Rd)                                   # (N, M, L+1)
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    fits = model.device_memory_bytes[None, None, :] <= Mem[..., None]           # (N, M, L+1)
    round_ok = fits.any(-1).all(-1)
    cuts = np.arange(L + 1)

    def solve(c):  # c (N, B, M) -> shares (N, B, M), U (N, B)
        B = c.shape[1]
        sel = lambda a: np.take_along_axis(np.repeat(a[:, None], B, 1), c[..., None], -1)[..., 0]  # noqa: E731
        f, U = allocate(model, c.reshape(N * B, Md), sel(t_d).reshape(N * B, Md), sel(t_l).reshape(N * B, Md),
                        sel(t_h).reshape(N * B, Md), np.repeat(t_ref, B), np.repeat(e_ref, B), w,
                        discrete_clocks=discrete_clocks)
        U = np.where(np.take_along_axis(np.repeat(fits[:, None], B, 1), c[..., None], -1)[..., 0].all(-1),
                     U.reshape(N, B), np.inf)
        return f.reshape(N, B, Md), U

    largest = np.where(fits, cuts, -1).max(-1).clip(0)                          # (N, M)
    # a device's best cut with an equal share and the others server-only: evaluated device by device
    starts = [np.zeros((N, Md), dtype=np.int64), largest]
    equal = np.zeros((N, Md), dtype=np.int64)
    for m in range(Md):
        c = np.zeros((N, L + 1, Md), dtype=np.int64)
        c[:, :, m] = cuts
        _, U = solve(c)
        equal[:, m] = U.argmin(1)
    starts.append(equal)
    best_c, best_U = None, None
    for c0 in starts:
        c = c0.copy()
        _, U = solve(c[:, None])
        U = U[:, 0]
        for _ in range(max_sweeps):
            changed = np.zeros(N, dtype=bool)
            for m in range(Md):
                trial = np.repeat(c[:, None], L + 1, 1)
                trial[:, :, m] = cuts
                _, Ut = solve(trial)
                j = Ut.argmin(1)
                better = Ut[np.arange(N), j] < U * (1 - 1e-12)
                c[:, m] = np.where(better, j, c[:, m])
                U = np.where(better, Ut[np.arange(N), j], U)
                changed |= better
            if not changed.any():
                break
        if best_c is None:
            best_c, best_U = c, U
        else:
            take = U < best_U
            best_c, best_U = np.where(take[:, None], c, best_c), np.where(take, U, best_U)
    f, U = solve(best_c[:, None])
    return _decision(model, best_c, f[:, 0], P, Ru, Rd, t_ref, e_ref, w, round_ok & np.isfinite(U[:, 0]))


def _decision(model, c, f, P, Ru, Rd, t_ref, e_ref, w, ok) -> Decision:
    """Decision (N, M) of parallel rounds from cuts and shares; rounds not ``ok`` masked."""
    c_safe = np.where(ok[:, None], c, 0)
    f_safe = np.where(ok[:, None] & (c_safe < model.n_cuts), f, model.f_max_hz / c.shape[1])
    T_round, E_round, T, E = model.parallel_round(c_safe, f_safe, P, Ru, Rd)
    U = w * T_round / t_ref + (1 - w) * E_round / e_ref
    okm = np.broadcast_to(ok[:, None], c.shape)
    return Decision.masked(okm, c, np.where(c_safe < model.n_cuts, f_safe, 0.0), T, E,
                           np.broadcast_to(U[:, None], c.shape))


def exhaustive_parallel(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float,
                        shares_hz=None) -> Decision:
    """Brute force for parallel rounds: every combination of cut layers and of shares from a grid (sum <= f_max).

    Nothing of CARD's allocation is used: U is evaluated with :meth:`CostModel.parallel_round` on the whole grid.
    Cost (L+1)^M x |grid|^M per round: small instances only (tests).

    Args: as :func:`card_parallel`; shares_hz: the share grid (Hz), default the multiples of the clock-table step
    up to f_max (what ``discrete_clocks=True`` chooses from).
    Returns: :class:`Decision` (N, M) as :func:`card_parallel`.
    """
    check_weight(w)
    P, Ru, Rd, Mem = _round_inputs(model, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes)
    N, Md = P.shape
    L, F = model.n_cuts, model.f_max_hz
    if shares_hz is None:
        step = float(model.clocks_hz[1] - model.clocks_hz[0]) if len(model.clocks_hz) > 1 else F
        shares_hz = step * np.arange(1, int(np.floor(F / step + 1e-9)) + 1)
    grid = np.asarray(shares_hz, dtype=float)
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    fits = model.device_memory_bytes[None, None, :] <= Mem[..., None]
    share_sets = {}
    for n in range(Md + 1):
        sets = np.array(list(product(grid, repeat=n)), dtype=float).reshape(len(grid) ** n, n)
        share_sets[n] = sets[sets.sum(1) <= F * (1 + 1e-9)]
    best_U = np.full(N, np.inf)
    best_c = np.zeros((N, Md), dtype=np.int64)
    best_f = np.zeros((N, Md))
    for combo in product(range(L + 1), repeat=Md):
        c = np.array(combo)
        ok = fits[:, np.arange(Md), c].all(-1)
        active = c < L
        sets = share_sets[int(active.sum())]
        f_sets = np.zeros((len(sets), Md))
        f_sets[:, active] = sets
        S = len(f_sets)
        cc = np.broadcast_to(c, (N * S, Md))
        T, E, _, _ = model.parallel_round(cc, np.tile(f_sets, (N, 1)),
                                          np.repeat(P, S, 0), np.repeat(Ru, S, 0), np.repeat(Rd, S, 0))
        U = (w * T / np.repeat(t_ref, S) + (1 - w) * E / np.repeat(e_ref, S)).reshape(N, S)
        j = U.argmin(1)
        u = np.where(ok, U[np.arange(N), j], np.inf)
        take = u < best_U
        best_U = np.where(take, u, best_U)
        best_c = np.where(take[:, None], c, best_c)
        best_f = np.where(take[:, None], f_sets[j], best_f)
    ok = np.isfinite(best_U)
    return _decision(model, best_c, np.where(best_c < L, best_f, 0.0), P, Ru, Rd, t_ref, e_ref, w, ok)


def card_rounds(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float, *,
                discrete_clocks: bool = False) -> Decision:
    """CARD for N rounds of M devices under any schedule: inputs (N, M), :class:`Decision` of shape (N, M).

    Per-device schedules ("sequential", "pipelined") solve each device-round alone (:func:`card`; the delay of a
    device-round is its own); parallel schedules solve each round jointly (:func:`card_parallel`).
    """
    P = np.asarray(device_flops_per_s, dtype=float)
    if P.ndim != 2:
        raise InvalidParameterError(f"device_flops_per_s has shape {P.shape}: must be (rounds, devices)")
    if model.parallel:
        return card_parallel(model, P, rate_up_bps, rate_down_bps, memory_bytes, w, discrete_clocks=discrete_clocks)
    flat = [np.broadcast_to(np.asarray(a, dtype=float), P.shape).reshape(-1)
            for a in (P, rate_up_bps, rate_down_bps, memory_bytes)]
    d = card(model, *flat, w, discrete_clocks=discrete_clocks)
    return _reshape(d, P.shape)


def exhaustive_rounds(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float,
                      grid_hz=None) -> Decision:
    """The brute force of every schedule on (N, M) inputs: :func:`exhaustive_search` per device-round, or
    :func:`exhaustive_parallel` per round (``grid_hz``: its clock grid or share grid)."""
    P = np.asarray(device_flops_per_s, dtype=float)
    if P.ndim != 2:
        raise InvalidParameterError(f"device_flops_per_s has shape {P.shape}: must be (rounds, devices)")
    if model.parallel:
        return exhaustive_parallel(model, P, rate_up_bps, rate_down_bps, memory_bytes, w, grid_hz)
    flat = [np.broadcast_to(np.asarray(a, dtype=float), P.shape).reshape(-1)
            for a in (P, rate_up_bps, rate_down_bps, memory_bytes)]
    return _reshape(exhaustive_search(model, *flat, w, grid_hz), P.shape)


def _reshape(d: Decision, shape) -> Decision:
    return Decision(*(getattr(d, k).reshape(shape) for k in
                      ("cut_layer", "frequency_hz", "delay_s", "energy_j", "objective", "feasible")))

"""CARD for the parallel schedules: every device's cut layer and its share of the server clock, jointly per round.

Devices of a round train at the same time; the server's clock is divided into shares f_m with sum f_m <= f_max
(the coupling); the round ends when the last device finishes. For fixed cuts the allocation is convex in the
round deadline tau and solved by a monotone Newton iteration on its KKT condition; the cuts start from a sweep
over deadlines and are refined by coordinate descent over devices, each step exact over one device's cut layers. Checked against the
brute force (tests/model/test_parallel.py). Source: docs/model.md, "Parallel schedule".
"""
from __future__ import annotations

from itertools import product

import numpy as np

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.card import Decision, card, exhaustive_search
from splitlora.model.system import CostModel, check_weight

_CHUNK = 2048  # rounds solved at once: bounded temporaries (one piece of 10^4 rounds: 1.7 s more, in fresh memory)


def _round_inputs(model: CostModel, P, Ru, Rd, M):
    """(N, M) float arrays, checked (FLOP/s, bit/s, bit/s, byte); the schedule must be a parallel one."""
    if not model.parallel:
        raise InvalidParameterError(f"schedule={model.schedule!r} is invalid here: needs 'parallel' or "
                                    "'parallel-pipelined' (use splitlora.model.card.card for per-device schedules)")
    if model.static_power_w != 0:
        raise InvalidParameterError(f"static_power_w={model.static_power_w!r} is invalid for the parallel schedules: "
                                    "must be 0 (docs/model.md \"Parallel schedule\")")
    P = np.asarray(P, dtype=float)
    if P.ndim != 2 or P.shape[1] < 1:
        raise InvalidParameterError(f"device_flops_per_s has shape {P.shape}: must be (rounds, devices), devices >= 1")
    out = [np.broadcast_to(np.asarray(a, dtype=float), P.shape) for a in (P, Ru, Rd, M)]
    for name, a in zip(("device_flops_per_s", "rate_up_bps", "rate_down_bps", "memory_bytes"), out):
        V.check_positive(name, a)
    return out


def _stages(model: CostModel, P, Ru, Rd):
    """Per-cut stage times of every device-round, each (N, M, L+1) (s)."""
    shape = P.shape
    t_d, t_l, t_h = model.stage_times_s(P.reshape(-1), Ru.reshape(-1), Rd.reshape(-1))
    return tuple(a.reshape(shape + (model.n_cuts + 1,)) for a in (t_d, t_l, t_h))


def _pace(model: CostModel, t_d, t_l, t_h):
    """A device's finish time as T(f) = max(A1 + k1 C / f, A2 + k2 C / f) (:meth:`CostModel.round_delay_s` written
    as two lines in 1 / f): (A1, k1, A2, k2), broadcasting (s, -, s, -). Sequential: A = I (T_d + T_l) + T_h and
    k = I twice; pipelined: A1 = T_d + T_l + T_h, k1 = I (the server paces) and A2 = A1 + (I - 1) max(T_d, T_l),
    k2 = 1 (the device or link does)."""
    I = float(model.iterations)
    if model.pipelined:
        A1 = t_d + t_l + t_h
        return A1, I, A1 + (I - 1) * np.maximum(t_d, t_l), 1.0
    A = I * (t_d + t_l) + t_h
    return A, I, A, I


def _need_hz(pace, cycles, tau):
    """Smallest clock share (Hz) with which a device of ``pace`` (:func:`_pace`) and ``cycles`` per mini-batch
    finishes by ``tau`` (s), broadcasting; inf if none does; 0 where it has no server work and finishes in time.
    Also returns k of the binding line (for dU/dtau)."""
    A1, k1, A2, k2 = pace
    C = np.asarray(cycles, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        s1 = tau - A1
        n1 = np.where(s1 > 0, k1 * C / s1, np.inf)
        if A1 is A2 and np.ndim(k1) == 0 and k1 == k2:  # one line (sequential stages): the same numbers, once
            return np.where(C > 0, n1, np.where(s1 >= 0, 0.0, np.inf)), k1
        s2 = tau - A2
        n2 = np.where(s2 > 0, k2 * C / s2, np.inf)
    need = np.where(C > 0, np.maximum(n1, n2), np.where((s1 >= 0) & (s2 >= 0), 0.0, np.inf))
    return need, np.where(n1 >= n2, k1, k2)


def allocate(model: CostModel, cut_layer, t_d, t_l, t_h, t_ref, e_ref, w: float, *, discrete_clocks: bool = False):
    """Optimal clock shares for fixed cut layers (the lower layer of parallel CARD), vectorised over rounds.

    Minimises w max_m T_m / T_ref + (1 - w) sum_m E_m / E_ref over shares f_m > 0 with sum f_m <= f_max (shares
    in multiples of the clock-table step with ``discrete_clocks``). Continuous: for a deadline tau each device
    needs f_m(tau) (:func:`_need_hz`), and U(tau) is convex; tau* is the smallest tau with sum f_m(tau) <= f_max,
    f_m <= f_max and dU/dtau = w / T_ref - (1 - w) / E_ref sum_m 2 kappa (I / k_m) f_m^3 >= 0 (k_m = I where the
    server paces the device, 1 where the device or link does), found by :func:`_deadline`. Discrete: the best of the
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
    t_ref = np.asarray(t_ref, dtype=float)
    e_ref = np.asarray(e_ref, dtype=float)
    pace = _pace(model, t_d, t_l, t_h)

    def cost(f):  # U of shares f (K, M, ...) on the last axis or the middle one
        T = model.round_delay_s(t_d, t_l, t_h, np.where(C > 0, C / np.where(f > 0, f, 1.0), 0.0)).max(-1)
        E = model.energy_j(I * C, f).sum(-1)
        return w * T / t_ref + (1 - w) * E / e_ref

    if discrete_clocks:
        step = float(model.clocks_hz[1] - model.clocks_hz[0]) if len(model.clocks_hz) > 1 else F
        levels = step * np.arange(1, int(np.floor(F / step + 1e-9)) + 1)                  # (Kf,)
        x = lambda a: a[..., None]  # noqa: E731
        cand = np.maximum(x(pace[0]) + x(pace[1] * C) / levels, x(pace[2]) + x(pace[3] * C) / levels)
        cand = np.where(x(C) > 0, cand, x(pace[2])).reshape(c.shape[0], -1)                # (K, M Kf) deadlines
        need, _ = _need_hz(tuple(x(p) if np.ndim(p) else p for p in pace), x(C), cand[:, None, :] * (1 + 1e-12))
        f = np.where(need > 0, np.maximum(np.ceil(np.round(need / step, 9)) * step, step), 0.0)   # (K, M, M Kf)
        ok = np.all(f <= F * (1 + 1e-12), axis=1) & (f.sum(1) <= F * (1 + 1e-9))
        fs = np.where(np.isfinite(f), f, 0.0)
        T = np.max(np.maximum(x(pace[0]) + x(pace[1] * C) / np.where(fs > 0, fs, 1.0),
                              x(pace[2]) + x(pace[3] * C) / np.where(fs > 0, fs, 1.0)) * (x(C) > 0)
                   + x(np.where(C > 0, 0.0, pace[2])), axis=1)
        E = model.energy_j(I * x(C), fs).sum(1)
        U = np.where(ok, w * T / x(t_ref) + (1 - w) * E / x(e_ref), np.inf)                # (K, M Kf)
        j = U.argmin(1)
        rows = np.arange(c.shape[0])
        return np.where(c < model.n_cuts, fs[rows, :, j], 0.0), U[rows, j]

    lo = np.max(np.where(C > 0, np.maximum(pace[0] + pace[1] * C / F, pace[2] + pace[3] * C / F), pace[2]), -1)
    tau = _deadline(pace, C, lo, F, w / np.broadcast_to(t_ref, lo.shape),
                    np.broadcast_to((1 - w) / e_ref * 2 * kappa * I, lo.shape))
    f, _ = _need_hz(pace, C, tau[:, None])
    f = np.where(C > 0, np.minimum(f, F), 0.0)
    total = f.sum(-1)
    f = f * np.where(total > F, F / np.where(total > F, total, 1.0), 1.0)[:, None]          # rounding guard
    return f, cost(f)


def _deadline(pace, C, lo, F, a, b, max_steps: int = 100):
    """The optimal deadline tau* (K,) of :func:`allocate`: the smallest tau >= lo (K,) with S(tau) = sum_m f_m(tau)
    <= F (the coupling) and Q(tau) = sum_m f_m(tau)^3 / k_m <= a / b (dU/dtau >= 0; a = w / T_ref, b = 2 (1 - w)
    kappa I / E_ref, both (K,)). Device m's need is f_m = k C / (tau - A) on its binding line: line 2 below the lines'
    crossing x_m = (k1 A2 - k2 A1) / (k1 - k2), line 1 from it on (:func:`_pace`); -f' = f / (tau - A).
    Newton steps on the transformed conditions 1 / S(tau) >= 1 / F and Q(tau)^(-1/3) >= (b / a)^(1/3): 1 / f_m is
    concave (a minimum of affine functions), so 1 / S, a harmonic sum of them, is concave and increasing, and its
    Newton point from the left stays left of its root (exact in one step for one device on one line); Q^(-1/3), the
    power mean of exponent -3 of the affine k^(1/3) / f_m, is concave between crossings and jumps up at each (past
    a crossing k rises from k2 to k1 and Q falls), so its Newton point stays left of its root when clipped to the
    next crossing (the step then lands on the crossing itself). tau* = max of the two
    roots: each step goes to the larger of the two Newton points, a monotone sequence that reaches tau*, stopped
    when it no longer moves (at most 9 steps on the benchmark's rounds), then raised by 1e-12 (relative) so that the
    shares fit. Raises RuntimeError if a row still moves after ``max_steps``. It starts at the largest of lo and
    two lower bounds from f_m >= k1 C_m / (tau - A1_min): tau* >= A1_min + k1 sum C / F and
    tau* >= A1_min + (b / a k1^2 sum C^3)^(1/3)."""
    A1, k1, A2, k2 = (np.broadcast_to(p, C.shape) for p in pace)
    pos = C > 0                                  # a device without server work: f = 0 (A = -inf: tau - A = inf)
    A1, A2 = np.where(pos, A1, -np.inf), np.where(pos, A2, -np.inf)
    kc1, kc2 = np.where(pos, k1 * C, 0.0), np.where(pos, k2 * C, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(pos & (k1 != k2), (k1 * A2 - k2 * A1) / (k1 - k2), np.inf)
        a1 = np.where(pos, A1, np.inf).min(1)
        start = a1 + np.maximum(kc1.sum(1) / F, np.cbrt(b / a * (kc1 ** 3 / k1).sum(1)))
    tau = np.where(np.isfinite(a1), np.maximum(lo, start), lo)
    idx = np.flatnonzero(np.isfinite(lo))
    arrs = [A1, A2, k1, k2, kc1, kc2, cross]
    loc = [x[idx] for x in arrs]
    al, bl, t = a[idx], b[idx], tau[idx]
    for _ in range(max_steps):
        if not len(idx):
            break
        A1l, A2l, k1l, k2l, kc1l, kc2l, xl = loc
        on1 = t[:, None] >= xl
        sl = t[:, None] - np.where(on1, A1l, A2l)
        k = np.where(on1, k1l, k2l)
        f = np.where(on1, kc1l, kc2l) / sl
        f3k = f * f * f / k
        S, Q = f.sum(1), f3k.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            zg = np.where(S > F, (1 / F - 1 / S) * S * S / (f / sl).sum(1), 0.0)
            J = np.cbrt(Q)
            zh = np.where(Q > al / bl, (1 / np.cbrt(al / bl) - 1 / J) * J * Q / (f3k / sl).sum(1), 0.0)
        nxt = np.where(xl > t[:, None] * (1 + 4 * np.finfo(float).eps), xl, np.inf).min(1)
        th = t + np.nan_to_num(zh, nan=0.0, posinf=np.inf)
        th = np.where(th >= nxt, nxt, th)        # clipped: exactly at the crossing, so line 1 binds there (on1)
        new = np.maximum(t + np.nan_to_num(zg, nan=0.0, posinf=0.0), np.where(np.isfinite(th), th, t))
        moved = new > t * (1 + 4 * np.finfo(float).eps)
        t = np.maximum(new, t)
        tau[idx] = t
        if not moved.all():
            keep = np.flatnonzero(moved)
            idx, al, bl, t = idx[keep], al[keep], bl[keep], t[keep]
            loc = [x[keep] for x in loc]
    if len(idx):
        raise RuntimeError(f"the clock-share deadline of {len(idx)} rounds did not converge in {max_steps} Newton "
                           "steps (splitlora.model.parallel._deadline); please report the inputs")
    return tau * (1 + 1e-12)


def card_parallel(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float, *,
                  discrete_clocks: bool = False, max_sweeps: int = 8) -> Decision:
    """CARD for the parallel schedules: each round's cut layers and clock shares (docs/model.md "Parallel schedule").

    Upper layer: coordinate descent over the devices of a round, started from each device's best cut with the
    others server-only; each step tries all cut layers of one device with the others fixed, each with its optimal
    allocation (:func:`allocate`), and keeps the best; sweeps stop when no device changes. With discrete clocks the
    descent continues from there with the discrete allocation (trials whose continuous optimum is no better than
    the incumbent are skipped: the discrete one cannot be better). Checked against :func:`exhaustive_parallel` (tests/model).

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
    parts = [_card_parallel(model, *(a[i:i + _CHUNK] for a in (P, Ru, Rd, Mem)), w, discrete_clocks, max_sweeps)
             for i in range(0, max(len(P), 1), _CHUNK)]  # 0 rounds: one empty piece
    return Decision(*(np.concatenate([getattr(d, k) for d in parts]) for k in
                      ("cut_layer", "frequency_hz", "delay_s", "energy_j", "objective", "feasible")))


def _card_parallel(model, P, Ru, Rd, Mem, w, discrete_clocks, max_sweeps):
    """:func:`card_parallel` on checked inputs (N, M) of at most ``_CHUNK`` rounds."""
    N, Md = P.shape
    L = model.n_cuts
    t_d, t_l, t_h = _stages(model, P, Ru, Rd)                                   # (N, M, L+1)
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    fits = model.device_memory_bytes[None, None, :] <= Mem[..., None]           # (N, M, L+1)
    dev = np.arange(Md)

    def solve(rows, c, discrete):  # rounds (K,), cuts (K, M) -> shares (K, M), U (K,); inf where a cut does not fit
        ok = fits[rows[:, None], dev, c].all(-1)
        f, U = np.zeros(c.shape), np.full(len(rows), np.inf)
        if not ok.any():
            return f, U
        r, cc = rows[ok], c[ok]
        sel = lambda a: a[r[:, None], dev, cc]  # noqa: E731
        f[ok], U[ok] = allocate(model, cc, sel(t_d), sel(t_l), sel(t_h), t_ref[r], e_ref[r], w, discrete_clocks=discrete)
        return f, U

    pace = _pace(model, t_d, t_l, t_h)                                          # (N, M, L+1) or scalars
    fast = _fastest_s(model, pace, np.broadcast_to(model.server_cycles, t_d.shape), fits)

    def evaluate(c, m, U, rows, j, discrete):  # shares and U of device m's cut j in rounds rows, others as in c
        ft, Ut = np.zeros((len(rows), Md)), np.full(len(rows), np.inf)
        if len(rows):
            t = c[rows].copy()
            t[:, m] = j
            if discrete:  # a discrete allocation is never better than the continuous one: try only those below U
                Uc = solve(rows, t, False)[1]
                try_ = Uc < U[rows] * (1 - 1e-12)
                if try_.any():
                    ft[try_], Ut[try_] = solve(rows[try_], t[try_], True)
            else:
                ft, Ut = solve(rows, t, False)
        return ft, Ut

    def descend(c, f, U, discrete, sweeps):
        active = np.ones(N, dtype=bool)  # rounds that changed in the last sweep (the others are at a fixed point)
        for _ in range(sweeps):
            changed = np.zeros(N, dtype=bool)
            for m in range(Md):
                # only the cuts whose lower bound (convexity in the deadline) could beat the incumbent are solved:
                # first each round's cut of least bound, then those whose bound is below the better of the two
                lb = _lower_bound(model, pace, fast, c, f, U, m, t_d, t_l, t_h, t_ref, e_ref, w)
                keep = (~(lb >= U[:, None] * (1 - 1e-12 + 1e-9)) | ~np.isfinite(U)[:, None]) & active[:, None]
                keep[every, c[:, m]] = False  # the incumbent itself: its U again, never better
                Uall = np.full((N, L + 1), np.inf)
                fall = np.zeros((N, L + 1, Md))
                first = np.where(keep, np.nan_to_num(lb, nan=-np.inf), np.inf).argmin(1)
                rows = np.flatnonzero(keep[every, first])
                fall[rows, first[rows]], Uall[rows, first[rows]] = evaluate(c, m, U, rows, first[rows], discrete)
                keep[rows, first[rows]] = False
                keep &= ~(lb >= (Uall.min(1) * (1 + 1e-9))[:, None])
                rows, j = np.nonzero(keep)
                fall[rows, j], Uall[rows, j] = evaluate(c, m, U, rows, j, discrete)
                jb = Uall.argmin(1)
                u = Uall[every, jb]
                better = u < U * (1 - 1e-12)
                c[:, m] = np.where(better, jb, c[:, m])
                f = np.where(better[:, None], fall[every, jb], f)
                U = np.where(better, u, U)
                changed |= better
            if not changed.any():
                break
            active = changed
        return c, f, U

    every = np.arange(N)
    start = _deadline_sweep(model, t_d, t_l, t_h, fits, t_ref, e_ref, w)
    U0, f0 = np.full(N, np.inf), np.zeros((N, Md))
    candidates = list(start)
    for i, c0 in enumerate(candidates):  # the best of the sweep's candidates, each with its exact allocation
        new = np.ones(N, dtype=bool)     # (a candidate equal to an earlier one of its round gives the same U)
        for earlier in candidates[:i]:
            new &= (c0 != earlier).any(1)
        fc, u = np.zeros((N, Md)), np.full(N, np.inf)
        fc[new], u[new] = solve(every[new], c0[new], False)
        take = u < U0
        U0 = np.where(take, u, U0)
        f0 = np.where(take[:, None], fc, f0)
        start[0] = np.where(take[:, None], c0, start[0])
    start = start[0]
    c, f, U = descend(start.copy(), f0, U0, False, max_sweeps)
    if discrete_clocks:
        fd, Ud = solve(every, c, True)
        c, f, U = descend(c, fd, Ud, True, max_sweeps)
    return _decision(model, c, f, P, Ru, Rd, t_ref, e_ref, w, fits.any(-1).all(-1) & np.isfinite(U))


def _fastest_s(model: CostModel, pace, cycles, fits):
    """Each device's finish time with the whole clock f_max (s), inf where the cut does not fit in memory."""
    A1, k1, A2, k2 = pace
    F = model.f_max_hz
    return np.where(fits, np.where(cycles > 0, np.maximum(A1 + k1 * cycles / F, A2 + k2 * cycles / F), A2), np.inf)


def _lower_bound(model, pace, fast, c, f, U, m, t_d, t_l, t_h, t_ref, e_ref, w):
    """Lower bounds (N, L+1) on U of every cut layer of device m with the other devices' cuts as in c (N, M), from
    the incumbent's shares f (N, M): U(tau) = w tau / T_ref + (1 - w) / E_ref sum_m E_m(f_m(tau)) with the coupling
    dropped; the other devices' part Phi is convex in the deadline tau, so it lies above its tangent at the incumbent's
    deadline tau0; the minimum of tangent + device m's energy over tau in [max fastest finish, U T_ref / w] (a trial
    beyond that deadline cannot beat U) is at an end, a line's stationary point or the lines' crossing (convexity).
    inf where the cut cannot finish in time; -inf (no pruning) where the bound is undefined."""
    N, M = c.shape
    I, kappa = model.iterations, model.kappa
    rows = np.arange(N)[:, None]
    sel = lambda a, d, cc: a[rows, d, cc] if np.ndim(a) else a  # noqa: E731
    C = model.server_cycles[c]
    T = model.round_delay_s(t_d[rows, np.arange(M), c], t_l[rows, np.arange(M), c], t_h[rows, np.arange(M), c],
                            np.where(C > 0, C / np.where(f > 0, f, 1.0), 0.0))
    tau0 = T.max(1)
    o = np.delete(np.arange(M), m)
    co = c[:, o]
    need, k = _need_hz(tuple(sel(p, o, co) for p in pace), C[:, o], tau0[:, None])
    ok = np.isfinite(need).all(1)
    need = np.where(np.isfinite(need), need, 0.0)
    phi0 = w * tau0 / t_ref + (1 - w) / e_ref * model.energy_j(I * C[:, o], need).sum(1)
    g = w / t_ref - (1 - w) / e_ref * (2 * kappa * (I / k) * need ** 3).sum(1)
    lo = np.maximum(fast[:, m, :], (fast[rows, o, co].max(1) if M > 1 else np.zeros(N))[:, None])   # (N, L+1)
    hi = (U * t_ref / w)[:, None]
    gc = g[:, None]
    beta = ((1 - w) / e_ref)[:, None] * kappa * I * model.server_cycles[None, :] ** 3   # (1 - w) E_m / E_ref = beta x^2
    A1, k1, A2, k2 = (p[:, m, :] if np.ndim(p) else p for p in pace)

    def h(t):  # tangent slope x tau + device m's energy term at deadline t
        x = np.maximum(k1 / (t - A1), k2 / (t - A2))
        return gc * t + np.where(beta > 0, beta * x * x, 0.0)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cands = [lo, np.broadcast_to(hi, lo.shape)]          # h is convex: its minimum on [lo, hi] is at an end,
        for A, kk in ((A1, k1), (A2, k2)):                    # a line's stationary point or the lines' crossing
            cands.append(np.where(gc > 0, A + np.cbrt(2 * beta * kk * kk / gc), np.inf))
        if np.any(k1 != k2):
            cands.append((k1 * A2 - k2 * A1) / (k1 - k2))
        best = np.min([h(np.minimum(np.maximum(np.nan_to_num(t, nan=np.inf), lo), hi)) for t in cands], axis=0)
    bound = (phi0 - g * tau0)[:, None] + best
    return np.where((lo <= hi) | ~ok[:, None], np.where(ok[:, None], bound, -np.inf), np.inf)


def _least_energy_cuts(model, pace, fits, taus, chunk: int = 32):
    """For deadlines taus (N, G), each device's cut layer (N, G, M) of least server energy among those that fit and
    finish by tau with a share <= f_max (the first of them on ties; cut 0 where none does), with its share and energy
    (N, G, M each; inf where none does). A cut without server work (C = 0) costs no energy; for C > 0 the energy
    kappa I C f(tau)^2, f(tau) = max over the lines of k C / (tau - A) (:func:`_pace`), is least where
    v = min over the lines of (tau - A) / (k C^1.5) is largest, among the cuts whose fastest finish
    (:func:`_fastest_s`) is <= tau: two operations per line and cut instead of the energies. Then f = 1 / (C^0.5 v)
    (and the energy kappa I C f^2 = kappa I / v^2, computed by :meth:`CostModel.energy_j`)."""
    Cs = model.server_cycles
    A1, k1, A2, k2 = pace
    N, M = fits.shape[:2]
    fast = _fastest_s(model, pace, np.broadcast_to(Cs, fits.shape), fits)
    pos, zero = np.flatnonzero(Cs > 0), np.flatnonzero(Cs <= 0)
    one_line = A1 is A2 and k1 == k2
    gone = ~fits[..., pos]                                  # a cut that does not fit: A = inf, so v = -inf
    lines = [(np.where(gone, np.inf, A1[..., pos]), 1.0 / (k1 * Cs[pos] ** 1.5))]
    if not one_line:
        lines.append((np.where(gone, np.inf, A2[..., pos]), 1.0 / (k2 * Cs[pos] ** 1.5)))
    fast_pos = fast[..., pos]
    out = np.empty((N, taus.shape[1], M), dtype=np.int64)
    vmax = np.empty(out.shape)
    v = x = None
    for i in range(0, N, chunk):
        r = slice(i, i + chunk)
        tau = taus[r, :, None, None]                                                    # (n, G, 1, 1)
        shape = (tau.shape[0], tau.shape[1], M, len(pos))
        if v is None or v.shape != shape:
            v, x = np.empty(shape), np.empty(shape)
        for k, (A, q) in enumerate(lines):
            np.multiply(np.subtract(tau, A[r, None], out=x), q, out=x)
            if k:
                np.minimum(v, x, out=v)
            else:
                v, x = x, v
        if len(pos):
            j = v.argmax(-1)[..., None]
            # the largest v is almost always a cut that finishes by tau with f_max; where it is not, the argmax over
            # the cuts that do (the first on ties: an earlier cut with the same v would have been the argmax)
            late = tau[..., 0] < np.take_along_axis(fast_pos[r, None], j, -1)[..., 0]
            if late.any():
                t_late = np.broadcast_to(tau[..., 0], late.shape)[late][:, None]
                vl = np.where(t_late < np.broadcast_to(fast_pos[r, None], v.shape)[late], -np.inf, v[late])
                j[late] = vl.argmax(-1)[:, None]
                v[late] = vl
            best, vm = pos[j[..., 0]], np.take_along_axis(v, j, -1)[..., 0]
        else:
            best, vm = np.zeros(shape[:3], dtype=np.int64), np.full(shape[:3], -np.inf)
        if len(zero):  # no server work: free wherever the device finishes by tau (s >= 0 on both lines, as _need_hz)
            z = fits[r, None][..., zero] & (tau - A1[r, None][..., zero] >= 0) & (tau - A2[r, None][..., zero] >= 0)
            free = z.any(-1)
            best = np.where(free, zero[z.argmax(-1)], best)
            vm = np.where(free, np.inf, vm)
        out[r], vmax[r] = best, vm
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = vmax > 0
        need = np.where(ok, np.where(vmax < np.inf, 1.0 / (np.sqrt(Cs[out]) * vmax), 0.0), np.inf)  # C = 0: free
        energy = np.where(ok, model.energy_j(model.iterations * Cs[out], np.where(ok, need, 0.0)), np.inf)
    return out, need, energy


def _deadline_sweep(model, t_d, t_l, t_h, fits, t_ref, e_ref, w, n_grid: int = 64, keep: int = 3):
    """Starting cuts of parallel CARD: for deadlines tau on a geometric grid from the fastest feasible round to
    T_ref / w (beyond it U > 1, worse than the reference), each device's cut with the least energy that finishes by
    tau (separable while the shares fit under f_max); the ``keep`` deadlines with the smallest U.
    Returns a list of ``keep`` cut arrays (N, M)."""
    C = np.broadcast_to(model.server_cycles, t_d.shape)
    fast = np.where(fits, model.round_delay_s(t_d, t_l, t_h, np.where(C > 0, C / model.f_max_hz, 0.0)), np.inf)
    lo = fast.min(-1).max(-1)                                                           # (N,)
    lo = np.where(np.isfinite(lo) & (lo > 0), lo, 1.0)                                  # infeasible rounds: any
    hi = np.maximum(t_ref / max(w, 1e-12), lo * (1 + 1e-9))
    taus = lo[:, None] * (hi / lo)[:, None] ** np.linspace(0, 1, n_grid)[None, :]        # (N, G)
    taus = taus * (1 + 1e-12)
    c, need, e_best = _least_energy_cuts(model, _pace(model, t_d, t_l, t_h), fits, taus)  # (N, G, M) each
    U = w * taus / t_ref[:, None] + (1 - w) * e_best.sum(-1) / e_ref[:, None]
    U = np.where(np.isfinite(e_best).all(-1) & (need.sum(-1) <= model.f_max_hz), U, np.inf)
    order = np.argsort(U, axis=1)[:, :keep]
    return [np.take_along_axis(c, order[:, k, None, None], 1)[:, 0] for k in range(min(keep, n_grid))]


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

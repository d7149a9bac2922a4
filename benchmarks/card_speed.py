"""CARD (vectorised) against what a user would write with scipy, for every schedule.

Per-device schedules (sequential, pipelined): scipy's bounded scalar minimisation per cut layer, per device-round,
on the same 300 device-rounds (Llama-3.2-1B, L = 32 sub-layer cuts, Devices 1..5, Markov channels, continuous
clock), decisions checked; then CARD alone on 10^6 device-rounds. Parallel schedules: the same cut search (deadline
sweep start, then coordinate descent) with every allocation solved by scipy SLSQP on the epigraph form, on 2
rounds of 5 devices, objectives checked; then CARD alone on 10^4 rounds of 5 devices.
Targets (issues 2 and 12): CARD >= 100x faster than the scipy solver of the same problem; 10^6 device-rounds in
< 2 s (per-device schedules); 10^4 rounds of 5 devices in < 2 s (parallel schedules), on a 2-core machine.
Writes benchmarks/results/card_speed.json. Run: `.venv/bin/python benchmarks/card_speed.py`.
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from splitlora import card, card_rounds, load_channel
from splitlora.model.parallel import _deadline_sweep, _stages
from splitlora.atomic import atomic_write
from splitlora.model.scenario import Scenario, channel_states
from splitlora.experiments.figures import git_state
from splitlora.model.system import objective
from splitlora.paths import BENCHMARK_RESULTS_DIR


def inputs(scenario, n):
    m = len(scenario.devices)
    states = channel_states("Markov", -(-n // m), m, seed=0)
    P, M = scenario.device_arrays()
    R = load_channel().rates_bps()[states].reshape(-1)[:n]
    return np.tile(P, len(states))[:n], R, R, np.tile(M, len(states))[:n]


def scipy_baseline(model, P, Ru, Rd, M, w):
    """Per device-round, per feasible cut: scipy's bounded scalar minimisation of U(f); then the best cut."""
    cuts, freqs, objs = [], [], []
    for k in range(len(P)):
        p, ru, rd = P[k:k + 1], Ru[k:k + 1], Rd[k:k + 1]
        t_ref, e_ref = model.references(p, ru, rd)
        best = (np.inf, -1, np.nan)
        for c in range(model.n_cuts + 1):
            if model.device_memory_bytes[c] > M[k]:
                continue
            def u(f, c=c):
                T, E = model.evaluate(np.array([c]), np.array([f]), p, ru, rd)
                return float(objective(T, E, t_ref, e_ref, w)[0])
            if c == model.n_cuts:
                val, f = u(model.f_max_hz), 0.0
            else:
                res = minimize_scalar(u, bounds=(model.f_min_hz, model.f_max_hz), method="bounded",
                                      options={"xatol": 1e-3})
                val, f = res.fun, res.x
            if val < best[0]:
                best = (val, c, f)
        objs.append(best[0]); cuts.append(best[1]); freqs.append(best[2])
    return np.array(cuts), np.array(freqs), np.array(objs)


def scipy_allocation(model, c, P, Ru, Rd, t_ref, e_ref, w):
    """U of the best clock shares for cuts c (M,) of one round by SLSQP on (tau / T_ref, f / f_max)."""
    L, F, I = model.n_cuts, model.f_max_hz, model.iterations
    act = np.flatnonzero(c < L)
    t_d, t_l, t_h = (a[np.arange(len(c)), c] for a in model.stage_times_s(P, Ru, Rd))
    idle = model.round_delay_s(t_d, t_l, t_h, 0.0)[c == L]
    if len(act) == 0:
        return w * idle.max() / t_ref
    C = model.server_cycles[c[act]]

    def u(x):
        return w * x[0] + (1 - w) * model.energy_j(I * C, x[1:] * F).sum() / e_ref

    def slack(x):
        T = model.round_delay_s(t_d[act], t_l[act], t_h[act], C / (x[1:] * F))
        return np.r_[x[0] - T / t_ref, x[0] - idle / t_ref]

    x0 = np.r_[2.0 / w, np.full(len(act), 0.5 / len(act))]
    res = minimize(u, x0, method="SLSQP", bounds=[(0, None)] + [(1e-4, 1)] * len(act),
                   constraints=[{"type": "ineq", "fun": slack}, {"type": "ineq", "fun": lambda x: 1 - x[1:].sum()}],
                   options={"ftol": 1e-12, "maxiter": 500})
    return res.fun


def scipy_parallel(model, P, Ru, Rd, M, w):
    """The parallel cut search of CARD (same starts, coordinate descent) with every allocation by scipy SLSQP."""
    N, Md = P.shape
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    t_d, t_l, t_h = _stages(model, P, Ru, Rd)
    fits = model.device_memory_bytes[None, None, :] <= M[..., None]
    starts = _deadline_sweep(model, t_d, t_l, t_h, fits, t_ref, e_ref, w)
    out = []
    for n in range(N):
        args = (P[n], Ru[n], Rd[n], t_ref[n], e_ref[n], w)
        best_u, best_c = np.inf, None
        for c0 in starts:
            u0 = scipy_allocation(model, c0[n].copy(), *args)
            if u0 < best_u:
                best_u, best_c = u0, c0[n].copy()
        c, U = best_c, best_u
        for _ in range(8):
            changed = False
            for m in range(Md):
                for cut in np.flatnonzero(fits[n, m]):
                    t = c.copy()
                    t[m] = cut
                    u = scipy_allocation(model, t, *args)
                    if u < U * (1 - 1e-12):
                        c, U, changed = t, u, True
            if not changed:
                break
        out.append(U)
    return np.array(out)


def per_device(schedule):
    sc = Scenario(discrete_clocks=False, schedule=schedule)
    model = sc.cost_model()
    w = sc.w
    P, Ru, Rd, M = inputs(sc, 300)
    t0 = time.perf_counter(); base = scipy_baseline(model, P, Ru, Rd, M, w); t_base = time.perf_counter() - t0
    card(model, P, Ru, Rd, M, w)  # warm-up
    t0 = time.perf_counter(); dec = card(model, P, Ru, Rd, M, w); t_card = time.perf_counter() - t0
    assert np.all(dec.objective <= base[2] * (1 + 1e-9)), "CARD worse than the scipy baseline"
    agree = float(np.mean(dec.cut_layer == base[0]))
    P6, Ru6, Rd6, M6 = inputs(sc, 10**6)
    t0 = time.perf_counter(); card(model, P6, Ru6, Rd6, M6, w); t_million = time.perf_counter() - t0
    t0 = time.perf_counter(); card(model, P6, Ru6, Rd6, M6, w, discrete_clocks=True); t_disc = time.perf_counter() - t0
    return {"device_rounds_compared": len(P), "cut_agreement": agree, "scipy_baseline_s": t_base, "card_s": t_card,
            "speedup": t_base / t_card, "max_objective_rel_gap": float(np.max(1 - dec.objective / base[2])),
            "card_1e6_s": t_million, "card_1e6_discrete_s": t_disc,
            "met": bool(t_base / t_card >= 100 and t_million < 2.0)}


def parallel(schedule, n_scipy=2, n_rounds=10**4):
    sc = Scenario(discrete_clocks=False, schedule=schedule)
    model = sc.cost_model()
    w, m = sc.w, len(sc.devices)
    P, Ru, Rd, M = (a.reshape(-1, m) for a in inputs(sc, n_rounds * m))
    t0 = time.perf_counter(); base = scipy_parallel(model, P[:n_scipy], Ru[:n_scipy], Rd[:n_scipy], M[:n_scipy], w)
    t_base = (time.perf_counter() - t0) / n_scipy
    t0 = time.perf_counter(); dec = card_rounds(model, P[:n_scipy], Ru[:n_scipy], Rd[:n_scipy], M[:n_scipy], w)
    t_card_small = (time.perf_counter() - t0) / n_scipy
    gap = float(np.max(dec.objective[:, 0] / base - 1))
    t0 = time.perf_counter(); card_rounds(model, P, Ru, Rd, M, w); t_all = time.perf_counter() - t0
    t0 = time.perf_counter(); card_rounds(model, P[:1000], Ru[:1000], Rd[:1000], M[:1000], w, discrete_clocks=True)
    t_disc = (time.perf_counter() - t0) * n_rounds / 1000
    per_round = t_all / n_rounds
    return {"rounds_compared": n_scipy, "devices": m, "scipy_s_per_round": t_base, "card_s_per_round_small": t_card_small,
            "speedup": t_base / per_round, "max_objective_rel_excess_over_scipy": gap,
            "card_rounds": n_rounds, "card_s": t_all, "card_discrete_s_extrapolated_from_1000": t_disc,
            "met": bool(t_base / per_round >= 100 and t_all < 2.0)}


def main():
    result = {"n_cuts": 32, "targets": {"speedup_min": 100, "card_1e6_device_rounds_max_s": 2.0,
                                        "card_1e4_parallel_rounds_max_s": 2.0}}
    for s in ("sequential", "pipelined"):
        result[s] = per_device(s)
        print(s, json.dumps(result[s]), flush=True)
    for s in ("parallel", "parallel-pipelined"):
        result[s] = parallel(s)
        print(s, json.dumps(result[s]), flush=True)
    result["met"] = all(result[s]["met"] for s in ("sequential", "pipelined", "parallel", "parallel-pipelined"))
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor(),
                         "load_average_1min": os.getloadavg()[0]}
    result["git"] = git_state()
    out = BENCHMARK_RESULTS_DIR / "card_speed.json"
    atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

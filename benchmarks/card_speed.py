"""CARD (vectorised) against what a user would write: scipy per cut layer, per device-round.

Both run on the same 1,000 device-rounds (Llama-3.2-1B, L = 32 sub-layer cuts, Devices 1..5, Markov channels,
continuous clock), timed in this one run, decisions checked equal; then CARD alone on 10^6 device-rounds.
Targets (issue 2): CARD >= 100x faster than the baseline; 10^6 decisions in < 2 s on a 2-core machine.
Writes benchmarks/results/card_speed.json. Run: `.venv/bin/python benchmarks/card_speed.py`.
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from scipy.optimize import minimize_scalar

from splitlora import card, load_channel
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


def main():
    sc = Scenario(discrete_clocks=False)
    model = sc.cost_model()
    w = sc.w
    P, Ru, Rd, M = inputs(sc, 1000)
    t0 = time.perf_counter(); base = scipy_baseline(model, P, Ru, Rd, M, w); t_base = time.perf_counter() - t0
    t0 = time.perf_counter(); dec = card(model, P, Ru, Rd, M, w); t_card = time.perf_counter() - t0
    assert np.array_equal(dec.cut_layer, base[0]), "CARD and the scipy baseline chose different cut layers"
    active = dec.cut_layer < model.n_cuts
    assert np.allclose(dec.frequency_hz[active], base[1][active], rtol=1e-5)
    assert np.all(dec.objective <= base[2] * (1 + 1e-9))
    P6, Ru6, Rd6, M6 = inputs(sc, 10**6)
    card(model, P6[:1000], Ru6[:1000], Rd6[:1000], M6[:1000], w)  # warm-up
    t0 = time.perf_counter(); card(model, P6, Ru6, Rd6, M6, w); t_million = time.perf_counter() - t0
    t0 = time.perf_counter(); card(model, P6, Ru6, Rd6, M6, w, discrete_clocks=True); t_million_disc = time.perf_counter() - t0
    result = {
        "device_rounds_compared": 1000, "n_cuts": model.n_cuts,
        "scipy_baseline_s": t_base, "card_s": t_card, "speedup": t_base / t_card,
        "max_frequency_rel_diff": float(np.max(np.abs(dec.frequency_hz[active] / base[1][active] - 1), initial=0)),
        "card_1e6_s": t_million, "card_1e6_discrete_s": t_million_disc,
        "targets": {"speedup_min": 100, "card_1e6_max_s": 2.0},
        "met": bool(t_base / t_card >= 100 and t_million < 2.0),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor()},
        "git": git_state(),
    }
    out = BENCHMARK_RESULTS_DIR / "card_speed.json"
    atomic_write(out, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

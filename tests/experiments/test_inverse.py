"""Benchmarks by both averaging rules, the parallel benchmarks, and the inverse reproduction's checks."""
from __future__ import annotations

import numpy as np
import pytest

from splitlora.experiments import analytic as ex
from splitlora.experiments import inverse as inv
from splitlora.model.baselines import reductions, run_policies_rounds
from splitlora.model.card import Decision
from splitlora.model.hardware import CHANNEL_STATES
from splitlora.model.parallel import exhaustive_rounds
from splitlora.model.scenario import Scenario, channel_states


def _dec(T, E, ok=None):
    T, E = np.asarray(T, float), np.asarray(E, float)
    ok = np.ones(T.shape, bool) if ok is None else np.asarray(ok)
    return Decision(np.zeros(T.shape, int), np.zeros(T.shape), T, E, np.zeros(T.shape), ok)


def test_reductions_pooled_and_per_round_by_hand():
    card = _dec([[1, 2], [3, 4]], [[1, 1], [2, 2]])
    bench = _dec([[2, 2], [6, 8]], [[2, 2], [2, 2]], ok=[[True, True], [True, False]])
    seq = reductions(card, bench, parallel=False)
    assert seq["delay_pooled"] == pytest.approx(1 - (1 + 2 + 3) / (2 + 2 + 6))
    assert seq["energy_pooled"] == pytest.approx(1 - (1 + 1 + 2) / (2 + 2 + 2))
    assert seq["delay_per_round"] == pytest.approx(1 - 3 / 4)          # round 2 is infeasible for the benchmark
    assert seq["energy_per_round"] == pytest.approx(1 - 2 / 4)
    par = reductions(card, bench, parallel=True)                        # a parallel round lasts its slowest device
    assert par["delay_per_round"] == pytest.approx(1 - 2 / 2)


@pytest.mark.parametrize("schedule", ["parallel", "parallel-pipelined"])
def test_parallel_benchmarks(schedule):
    sc = Scenario(schedule=schedule, discrete_clocks=False)
    model = sc.cost_model()
    states = channel_states("Markov", 3, 5, seed=1)
    P, M = sc.device_arrays()
    R = np.array([2e8, 1e8, 4e7])[states]
    P, M = np.broadcast_to(P, states.shape), np.broadcast_to(M, states.shape)
    res = run_policies_rounds(model, P, R, R, M, 0.3, fixed_cut="memory limit",
                              policies=("CARD", "server-only", "fixed cut", "random cut", "CARD cut, f_max",
                                        "CARD clock, fixed cut"))
    # server-only: every device at c = 0 with the equal share f_max / 5, and its U is 1 (it is the reference)
    T, E, Tm, Em = model.parallel_round(np.zeros((3, 5), int), model.f_max_hz / 5, P, R, R)
    np.testing.assert_allclose(res["server-only"].delay_s, Tm, rtol=1e-12)
    np.testing.assert_allclose(res["server-only"].objective, 1.0, rtol=1e-12)
    # the memory-limit fixed cut is each device's largest cut that fits
    largest = np.array([np.flatnonzero(model.device_memory_bytes <= m).max() for m in M[0]])
    np.testing.assert_array_equal(res["fixed cut"].cut_layer[0], largest)
    # CARD's round objective is never above any benchmark's; allocating the fixed cut's shares never hurts
    for name, d in res.items():
        assert np.all(res["CARD"].objective <= d.objective * (1 + 1e-9)), name
    assert np.all(res["CARD clock, fixed cut"].objective <= res["fixed cut"].objective * (1 + 1e-9))


def test_inverse_samples_are_seeded_and_in_range():
    a, b = inv.sample_parameters(200, seed=3), inv.sample_parameters(200, seed=3)
    assert a.equals(b) and not a.equals(inv.sample_parameters(200, seed=4))
    for k in ("w", "device_utilisation", "bandwidth_mhz", "snr_normal_db", "snr_spread_db"):
        lo, hi = inv.SPACE[k]
        assert a[k].between(lo, hi).all(), k
    for k in ("schedule", "precision", "benchmark_set", "averaging", "steps_per_round", "batch_size", "seq_len"):
        assert set(a[k]) <= set(inv.SPACE[k]), k
    assert 0.35 < (a.fixed_cut == "memory limit").mean() < 0.65


def test_inverse_claims_match_brute_force_decisions():
    """C1 / C2 of a sample come from CARD's cuts; for per-device schedules those equal the exhaustive search's."""
    table = inv.sample_parameters(40, seed=0)
    rows = table[table.schedule.isin(["sequential", "pipelined"])].head(3)
    assert len(rows) == 3
    for p in rows.to_dict("records"):
        out = inv.evaluate_sample(p, rounds=2)
        sc, rates, _ = inv.sample_scenario(p)
        P, M = sc.device_arrays()
        R = np.full((1, len(P)), rates[CHANNEL_STATES.index("Normal")])
        e = exhaustive_rounds(sc.cost_model(), P[None], R, R, M[None], sc.w)
        assert out["cuts"] == " , ".join(map(str, e.cut_layer[0]))
        assert out["distance"] >= 0 and out["accepted"] == (out["c1"] and out["c2"] and out["c3"] and out["c4"])
        if p["schedule"] == "sequential":
            assert not out["c1"]                                       # D1: never interior without memory


def test_claims_table_has_every_schedule_and_the_closest_sample():
    closest = inv.closest_sample(inv.inverse_reproduction(3, seed=0, rounds=2))
    table = ex.claims_table(rounds=3, n_instances=3, closest=closest)
    for s in ("sequential", "pipelined", "parallel", "parallel-pipelined", "closest_sample"):
        assert table[s].iloc[0] != "", s
    assert table.sequential.iloc[0].endswith("(no)")                    # D1: sequential never gives C1
    text = ex.claims_markdown(table, closest)
    assert "closest_sample (inverse reproduction" in text and f"schedule={closest['schedule']}" in text

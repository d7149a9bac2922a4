"""Benchmarks by both averaging rules, the parallel benchmarks, and the inverse reproduction's checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from splitlora.errors import InvalidParameterError
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
    """C1..C4 of a sample, recomputed for per-device schedules from the exhaustive search and CostModel.evaluate:
    the cuts and clocks (C1, C2) of the Normal round, and the fixed-cut benchmark's pooled reductions (C3, C4)."""
    table = inv.sample_parameters(40, seed=0)
    rows = table[table.schedule.isin(["sequential", "pipelined"])].head(3)
    assert len(rows) == 3
    for p in rows.to_dict("records"):
        out = inv.evaluate_sample(p, rounds=2)
        sc, rates, fixed = inv.sample_scenario(p)
        model, (P, M) = sc.cost_model(), sc.device_arrays()
        L = model.n_cuts
        R = np.full((1, len(P)), rates[CHANNEL_STATES.index("Normal")])
        e = exhaustive_rounds(model, P[None], R, R, M[None], sc.w)
        cuts, clocks = e.cut_layer[0], e.frequency_hz[0] / 1e9
        assert out["cuts"] == " , ".join(map(str, cuts))
        c1 = cuts[0] == L and cuts[-1] == 0 and np.all(np.diff(cuts) <= 0) and np.any((cuts > 0) & (cuts < L))
        active = clocks[cuts < L]
        c2 = len(active) >= 2 and np.all(np.diff(active) >= -1e-12) and active[-1] > active[0]
        assert (out["c1"], out["c2"]) == (bool(c1), bool(c2))
        if p["schedule"] == "sequential":
            assert not out["c1"]                                       # D1: never interior without memory
        # the fixed cut at f_max against the exhaustive optimum, pooled over the Markov device-rounds
        states = channel_states("Markov", 2, len(P), seed=0)
        Pr, Mr, Rr = np.broadcast_to(P, states.shape), np.broadcast_to(M, states.shape), rates[states]
        best = exhaustive_rounds(model, Pr, Rr, Rr, Mr, sc.w)
        fits = model.device_memory_bytes[None, None, :] <= Mr[..., None]
        c_fix = fits.cumsum(-1).argmax(-1) if fixed == "memory limit" else np.full(states.shape, fixed)
        ok = np.take_along_axis(fits, c_fix[..., None], -1)[..., 0] & best.feasible
        T_fix, E_fix = model.evaluate(c_fix.reshape(-1), np.full(c_fix.size, model.f_max_hz), Pr.reshape(-1),
                                      Rr.reshape(-1), Rr.reshape(-1))
        comp = ex.policy_comparison(sc, rounds=2, seed=0, conditions=("Markov",), fixed_cut=fixed, rates_bps=rates)
        row = comp[comp.policy == "fixed cut"].iloc[0]
        ok = ok.reshape(-1)
        assert ok.any()
        assert row.delay_reduction == pytest.approx(1 - best.delay_s.reshape(-1)[ok].sum() / T_fix[ok].sum(), rel=1e-9)
        assert row.energy_reduction == pytest.approx(1 - best.energy_j.reshape(-1)[ok].sum() / E_fix[ok].sum(), rel=1e-9)
        # C3 / C4 are the mean over the sample's benchmark set by its averaging rule, within 5 points of the paper
        tail = "" if p["averaging"] == "pooled" else "_per_round"
        sub = comp[comp.policy.isin(ex.BENCHMARK_SETS[p["benchmark_set"]])]
        d, en = np.nanmean(sub["delay_reduction" + tail]), np.nanmean(sub["energy_reduction" + tail])
        assert out["delay_reduction"] == pytest.approx(d, rel=1e-12) and out["energy_reduction"] == pytest.approx(en, rel=1e-12)
        assert out["c3"] == bool(abs(d - 0.708) <= 0.05) and out["c4"] == bool(abs(en - 0.531) <= 0.05)
        assert out["accepted"] == (out["c1"] and out["c2"] and out["c3"] and out["c4"])
        assert out["distance"] == pytest.approx(abs(d - 0.708) + abs(en - 0.531) + (not c1) + (not c2), rel=1e-12)


def test_claims_table_has_every_schedule_and_the_closest_sample():
    closest = inv.closest_sample(inv.inverse_reproduction(3, seed=0, rounds=2))
    table = ex.claims_table(rounds=3, n_instances=3, closest=closest)
    for s in ("sequential", "pipelined", "parallel", "parallel-pipelined", "closest_sample"):
        assert table[s].iloc[0] != "", s
    assert table.sequential.iloc[0].endswith("(no)")                    # D1: sequential never gives C1
    text = ex.claims_markdown(table, closest)
    assert "closest_sample (inverse reproduction" in text and f"schedule={closest['schedule']}" in text


def test_refined_samples_stay_local_and_out_of_the_shares():
    """The local search keeps each start's discrete choices, stays in SPACE and near its start (2 steps per chain
    here), is seeded, re-evaluates to its own row, and does not enter the uniform acceptance shares; bad tables are
    refused."""
    table = inv.inverse_reproduction(8, seed=2, rounds=2, refine=8)
    again = inv.inverse_reproduction(8, seed=2, rounds=2, refine=8)
    pd.testing.assert_frame_equal(table, again)
    uni, ref = table[table.stage == "uniform"], table[table.stage == "refined"]
    assert len(uni) == 8 and len(ref) == 8 and uni.confirmed.isna().all()
    starts = uni.sort_values(["accepted", "distance"], ascending=[False, True], kind="stable").head(4)
    discrete = ["schedule", "precision", "benchmark_set", "averaging", "steps_per_round", "batch_size", "seq_len",
                "fixed_cut"]
    for k, (_, r) in enumerate(ref.iterrows()):
        start = starts.iloc[k % 4]
        assert all(r[d] == start[d] for d in discrete)
        for name, step in inv.REFINE_STEPS.items():
            lo, hi = inv.SPACE[name]
            assert lo <= r[name] <= hi
            gap = abs(np.log(r[name] / start[name])) if name == "bandwidth_mhz" else abs(r[name] - start[name])
            assert gap <= 2 * 6 * step                          # at most 2 steps of a chain, each within 6 sigma
        assert any(r[name] != start[name] for name in inv.REFINE_STEPS)
        out = inv.evaluate_sample(r.to_dict(), rounds=2, seed=2)
        assert out["distance"] == pytest.approx(r["distance"], rel=1e-12) and out["cuts"] == r["cuts"]
    acc = inv.acceptance(table)
    assert acc.samples.sum() == 8
    per_schedule = inv.acceptance(table, by=["schedule"]).set_index("schedule")
    assert per_schedule.samples.to_dict() == uni.groupby("schedule").size().to_dict()
    flipped = table.assign(accepted=table.stage == "refined", confirmed=table.stage == "refined")
    assert inv.acceptance(flipped).accepted_share.sum() == 0
    ranges = inv.accepted_ranges(flipped)
    assert set(ranges.stage) == {"refined"} and ranges.groupby("schedule").accepted.first().sum() == 8
    assert ranges.groupby("schedule").confirmed.first().sum() == 8
    with pytest.raises(InvalidParameterError, match="no uniform samples"):
        inv.refine_samples(table[table.stage == "refined"], 2)
    with pytest.raises(InvalidParameterError, match="missing columns"):
        inv.refine_samples(table.drop(columns="w"), 2)


def test_refined_acceptance_is_confirmed_on_other_channel_draws(monkeypatch):
    """An accepted refined sample is evaluated again with seed + 1 and 4 x the rounds; confirmed is that verdict."""
    calls = []

    def fake(p, base=None, rounds=10, seed=0):
        calls.append((rounds, seed))
        ok = seed == 0 or p["w"] > 0.5              # accepted on the search's draws; confirmed only for large w
        return {"cuts": "", "clocks_ghz": "", "delay_reduction": 0.7, "energy_reduction": 0.5, "c1": ok, "c2": ok,
                "c3": ok, "c4": ok, "accepted": ok, "distance": 0.0 if ok else 1.0}

    start = inv.sample_parameters(1, seed=0).assign(stage="uniform", accepted=False, distance=1.0)
    start["w"] = 0.5
    monkeypatch.setattr(inv, "evaluate_sample", fake)
    out = inv.refine_samples(start, 6, seed=0, rounds=3)
    assert out.accepted.all()
    np.testing.assert_array_equal(out.confirmed, out.w > 0.5)
    assert 0 < out.confirmed.sum() < 6
    assert calls == [(3, 0), (12, 1)] * 6

"""Convergence experiment helpers: partitions, shares, each mode's modelled delay, the race (issue 13)."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from splitlora.errors import InvalidParameterError
from splitlora.experiments import convergence as cv
from splitlora.model.hardware import load_channel
from splitlora.model.scenario import DEVICE_NAMES, Scenario, channel_states
from splitlora.training.trainer import SplitTrainConfig


def test_reasoning_steps_and_bins():
    a = "Natalia sold 48/2 = 24 clips.\nShe sold 48+24 = 72.\n\n#### 72"
    assert cv.reasoning_steps(a) == 2
    assert cv.step_bins([a, "a\nb\nc\n#### 1", "a\nb\nc\nd\n#### 1", "1\n2\n3\n4\n5\n6\n#### 1"]).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partition_is_disjoint_complete_and_follows_the_shares(kind):
    rng = np.random.default_rng(0)
    bins = rng.integers(0, 4, size=503)
    shares = cv.device_shares("slow", 5, 2.0)
    np.testing.assert_allclose(shares, np.array([1, 2, 4, 8, 16]) / 31)
    parts = cv.partition(bins, shares, kind, alpha=0.3, seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(503))
    assert [len(p) for p in parts[:-1]] == [int(np.floor(s * 503)) for s in shares[:-1]]


def test_dirichlet_partition_skews_the_bins_and_iid_does_not():
    bins = np.repeat(np.arange(4), 250)
    tv = {}
    for kind in ("iid", "dirichlet"):
        parts = cv.partition(bins, np.ones(5) / 5, kind, alpha=0.1, seed=0)
        hists = np.array([np.bincount(bins[p], minlength=4) / len(p) for p in parts])
        tv[kind] = 0.5 * np.abs(hists - 0.25).sum(1).mean()  # mean total-variation distance to the global mix
    assert tv["iid"] < 0.1 < 0.4 < tv["dirichlet"]
    with pytest.raises(InvalidParameterError, match="partition"):
        cv.partition(bins, np.ones(5), "label")


def test_steps_per_device_follow_the_shares():
    assert cv.steps_per_device(cv.device_shares("equal", 5), 2) == [2] * 5
    assert cv.steps_per_device(cv.device_shares("slow", 5), 2) == [1, 1, 1, 3, 5]


SETUP = SimpleNamespace(architecture="smollm2-135m", config=SplitTrainConfig(granularity="block"), batch_size=4,
                        seq_len=128, lora=SimpleNamespace(r=8), steps_per_round=2, devices=DEVICE_NAMES, rounds=3)


def test_each_mode_plan_has_its_schedules_delay():
    """sequential: the round is the sum of the devices' turns (CostModel.evaluate per device, its own I_m);
    splitfed / fedlora: the round is the slowest device of the parallel schedule (CostModel.parallel_round)."""
    steps = [1, 1, 2, 2, 4]
    sc = Scenario(model="smollm2-135m", granularity="block", batch_size=4, seq_len=128, lora_rank=8, steps_per_round=2,
                  w=0.1, devices=DEVICE_NAMES)
    P, _ = sc.device_arrays()
    R = load_channel().rates_bps()[channel_states("Markov", 3, 5, 0)]
    seq = cv.plan_rounds(SETUP, "sequential", steps)
    cost = sc.cost_model()
    for n in range(3):
        rows = seq[seq["round"] == n]
        want = sum(replace(cost, iterations=steps[m]).evaluate(
            [rows.cut_layer.iloc[m]], [rows.f_hz.iloc[m] or cost.f_max_hz], [P[m]], [R[n, m]], [R[n, m]])[0][0]
            for m in range(5))
        assert rows.round_delay_s.iloc[0] == pytest.approx(want, rel=1e-12)
    par = replace(sc, schedule="parallel").cost_model()
    for mode in ("splitfed", "fedlora"):
        plan = cv.plan_rounds(SETUP, mode, steps)
        c = plan.pivot(index="round", columns="device", values="cut_layer").to_numpy()
        f = plan.pivot(index="round", columns="device", values="f_hz").to_numpy()
        assert f[c < par.n_cuts].sum() > 0 or mode == "fedlora"
        assert (f.sum(1) <= par.f_max_hz * (1 + 1e-9)).all()
        T = np.stack([replace(par, iterations=steps[m]).parallel_round(c, f, np.broadcast_to(P, (3, 5)), R, R)[2][:, m]
                      for m in range(5)], 1)
        np.testing.assert_allclose(plan.groupby("round").round_delay_s.first().to_numpy(), T.max(1), rtol=1e-12)
        if mode == "fedlora":
            assert (c == par.n_cuts).all()


def test_fedlora_memory_names_the_devices_that_cannot_hold_the_model():
    small = cv.fedlora_memory(SETUP)
    assert small.fits.all()  # 135M parameters fit even the Nano's 2.5 GB
    big = cv.fedlora_memory(replace_setup(architecture="llama-3.2-1b", seq_len=512))
    need = Scenario(model="llama-3.2-1b", granularity="block", batch_size=4, seq_len=512, lora_rank=8,
                    steps_per_round=2).profile().device_memory_bytes[-1]
    assert big.memory_needed_gb.iloc[0] == pytest.approx(need / 1e9)
    assert big.fits.tolist() == [need <= m * 1e9 for m in big.training_memory_gb]
    assert not big.fits.all() and big.fits.any()


def replace_setup(**kw):
    return SimpleNamespace(**{**vars(SETUP), **kw})


def test_race_reads_the_curves():
    def curve(mode, times, losses):
        return pd.DataFrame(dict(partition="iid", shares="equal", mode=mode, round=range(len(times)),
                                 modelled_time_s=times, heldout_loss=losses))
    curves = pd.concat([curve("a", [0, 1, 2, 3], [2.0, 1.5, 1.2, 1.0]), curve("b", [0, 4, 8], [2.0, 1.1, 0.9])])
    r = cv.race(curves).set_index("mode")
    assert r.budget_s.tolist() == [3, 3] and r.target_loss.iloc[0] == 1.0
    assert r.loss_at_budget.tolist() == [1.0, 2.0]
    assert r.time_to_target_s["a"] == 3.0
    assert r.time_to_target_s["b"] == pytest.approx(4 + 4 * (1.1 - 1.0) / (1.1 - 0.9))
    assert r["first"].tolist() == [True, False] and r.time_vs_fastest["b"] == pytest.approx(6 / 3)

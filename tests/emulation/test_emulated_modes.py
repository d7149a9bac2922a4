"""The emulated run in every training mode: its delays and energies against the delay model of the mode's schedule
(issue 13: "the delay of each mode in the emulated run equals the delay model of its schedule")."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from splitlora.emulation.run import EMULATION_SCENARIO, emulated_training
from splitlora.errors import InvalidParameterError
from splitlora.model.profile import ATTN_TARGETS, profile_model
from splitlora.model.system import CostModel, Workload

I = 2  # mini-batches per device per round
SC = replace(EMULATION_SCENARIO, devices=("Device 1", "Device 5"), steps_per_round=I, batch_size=2, seq_len=24,
             schedule="parallel")
POLICIES = {"splitfed": ("CARD", "fixed cut"), "splitfed_v1": ("CARD", "fixed cut"), "fedlora": ("device-only",)}


@pytest.fixture(scope="module")
def tiny():
    from splitlora.training.models import load_model_and_tokenizer

    return load_model_and_tokenizer(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module", params=list(POLICIES))
def parallel_run(request, tiny):
    model, tok = tiny
    mode = request.param
    return mode, emulated_training(POLICIES[mode], SC, mode=mode, rounds=2, model=model, tokenizer=tok, seed=1), model


def cost_of(model, sc=SC) -> CostModel:
    """The cost model of the trained tiny model under ``sc`` (its B, s, rank, granularity, I and schedule), built here
    from its profile (not taken from the emulation)."""
    prof = profile_model(model.config, batch_size=sc.batch_size, seq_len=sc.seq_len, granularity=sc.granularity,
                         lora_rank=sc.lora_rank, lora_targets=ATTN_TARGETS, param_bytes=4, wire_bytes=4,
                         activation_bytes=4)
    return CostModel.from_profile(prof, sc.hardware_profiles().server(sc.server),
                                  Workload(sc.steps_per_round, schedule=sc.schedule))


def model_rounds(cost, df, cut=None, share=None):
    """CostModel.parallel_round for the table's decisions and rates (or the given wrong ones), per policy-round:
    (device delay (K, M), device energy (K, M), round delay (K,), round energy (K,))."""
    g = df.sort_values(["policy", "round", "device"])
    M = g.device.nunique()
    shape = (-1, M)
    c = (g.cut_layer.to_numpy() if cut is None else cut).reshape(shape)
    f = (g.frequency_hz.to_numpy() if share is None else share).reshape(shape)
    P = np.array([SC.device_specs()[name].flops_per_s for name in g.device_name]).reshape(shape)
    R = (g.rate_mbps.to_numpy() * 1e6).reshape(shape)
    T_round, E_round, T, E = cost.parallel_round(c, f, P, R, R)
    return T, E, T_round, E_round


def test_parallel_modes_delay_and_energy_equal_the_parallel_schedule(parallel_run):
    """Per device: device, link and server time and server energy equal the model to 1e-9; the delay too once the
    hand-over's measured bytes (torch.save framing; round 0 downloads no AdamW moments) are replaced by the
    model's. Per round: delay = the slowest device, energy = the sum, both equal CostModel.parallel_round."""
    mode, df, model = parallel_run
    cost = cost_of(model)
    L = cost.n_cuts
    assert set(df["mode"]) == {mode} and df.feasible.all() and np.isfinite(df.loss).all()
    assert len(df) == len(POLICIES[mode]) * 2 * 2
    if mode == "fedlora":
        assert (df.cut_layer == L).all() and (df.energy_j == 0).all() and (df.server_cycles == 0).all()
    else:
        assert (df.cut_layer < L).all() and (df.server_cycles > 0).any()
    for col in ("device_flops", "device_time_s", "link_time_s", "server_cycles", "server_time_s", "energy_j"):
        pred = col.replace("_s", "_pred_s").replace("_j", "_pred_j") if col.endswith(("_s", "_j")) else col + "_pred"
        np.testing.assert_allclose(df[col], df[pred], rtol=1e-9, atol=1e-15, err_msg=col)
    active = df.cut_layer < L
    np.testing.assert_allclose(df.applied_clock_hz[active], df.frequency_hz[active], rtol=1e-9)
    ho = df.cut_layer > 0
    assert ho.any() and (df.handover_bytes[ho] / df.handover_bytes_pred[ho]).between(1.0, 1.5).all()
    # the model of the schedule, recomputed here from the table's decisions and rates
    T, E, T_round, E_round = model_rounds(cost, df)
    g = df.sort_values(["policy", "round", "device"])
    modelled_handover = (g.delay_s - g.handover_time_s + g.handover_time_pred_s).to_numpy().reshape(T.shape)
    np.testing.assert_allclose(modelled_handover, T, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(g.energy_j.to_numpy().reshape(E.shape), E, rtol=1e-9, atol=1e-18)
    np.testing.assert_allclose(modelled_handover.max(1), T_round, rtol=1e-9)
    rounds = g.groupby(["policy", "round"], sort=True)
    np.testing.assert_allclose(rounds.round_energy_j.first(), E_round, rtol=1e-9, atol=1e-18)
    np.testing.assert_array_equal(rounds.round_delay_s.first(), rounds.delay_s.max())  # the slowest device
    np.testing.assert_allclose(rounds.round_energy_j.first(), rounds.energy_j.sum(), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(rounds.round_delay_pred_s.first(), T_round, rtol=1e-12)
    # the comparison can fail: a wrong share (halved), or for fedlora a wrong cut, changes the model's delay
    if mode == "fedlora":
        T_w = model_rounds(cost, df, cut=np.full(len(g), L - 1), share=np.full(len(g), cost.f_max_hz / 2))[0]
    else:
        T_w = model_rounds(cost, df, share=g.frequency_hz.to_numpy() / 2)[0]
    assert not np.allclose(modelled_handover, T_w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("parallel_run", ["splitfed", "splitfed_v1"], indirect=True)
def test_cuts_change_learning_only_in_splitfed_v2(parallel_run):
    """SFL-V1 averages a server-side copy per device, so a round's training does not depend on the cuts: same losses
    for every policy. SFL-V2 shares one server-side adapter updated round-robin: a LoRA matrix on the server side is
    trained sequentially over the devices, on the device side in parallel and averaged, so the cuts matter."""
    mode, df, _ = parallel_run
    losses = df.pivot_table(index=["round", "device"], columns="policy", values="loss").to_numpy()
    assert losses.shape == (4, 2)
    same = np.isclose(losses, losses[:, :1], rtol=1e-5, atol=0).all(1)
    if mode == "splitfed_v1":
        assert same.all()
    else:  # from each device's second mini-batch on (the mean loss of its I = 2), after the other's server update
        assert not same.any()


def test_splitfed_with_one_device_equals_sequential(tiny):
    """One device, server-only (c = 0, the whole clock f_max: the parallel equal share of one device): splitfed and
    the sequential turns give the same losses, delays and energies."""
    model, tok = tiny
    one = replace(SC, devices=("Device 3",))
    seq = emulated_training(("server-only",), replace(one, schedule="sequential"), rounds=2, model=model,
                            tokenizer=tok, seed=2)
    par = emulated_training(("server-only",), one, mode="splitfed", rounds=2, model=model, tokenizer=tok, seed=2)
    assert (par.frequency_hz == seq.frequency_hz).all() and (par.cut_layer == 0).all()
    np.testing.assert_allclose(par.loss, seq.loss, rtol=0, atol=1e-6)
    for col in ("delay_s", "delay_pred_s", "energy_j", "energy_pred_j", "server_time_s", "link_time_s"):
        np.testing.assert_allclose(par[col], seq[col], rtol=1e-12, err_msg=col)
    np.testing.assert_allclose(par.round_delay_s, par.delay_s, rtol=0)


def test_infeasible_round_is_reported_and_not_trained(tiny, monkeypatch):
    """A round whose decision does not fit (forced here for round 0) has rows with feasible False and no cost, and is
    not trained; round 1 then trains exactly its own mini-batches (its counted FLOPs are one round's)."""
    import splitlora.emulation.run as er
    from splitlora.model.card import Decision

    real = er.run_policies_rounds

    def round0_infeasible(*args, seed, **kwargs):
        out = real(*args, seed=seed, **kwargs)
        if seed == 3:  # round 0 of seed=3
            out = {k: Decision.masked(np.zeros_like(d.feasible), d.cut_layer, d.frequency_hz, d.delay_s, d.energy_j,
                                      d.objective) for k, d in out.items()}
        return out

    monkeypatch.setattr(er, "run_policies_rounds", round0_infeasible)
    model, tok = tiny
    df = emulated_training(("fixed cut",), SC, mode="splitfed", rounds=2, model=model, tokenizer=tok, seed=3)
    first, second = df[df["round"] == 0], df[df["round"] == 1]
    assert not first.feasible.any() and (first.cut_layer == -1).all() and first.loss.isna().all()
    assert second.feasible.all() and np.isfinite(second.loss).all()
    np.testing.assert_allclose(second.device_flops, second.device_flops_pred, rtol=1e-9)
    np.testing.assert_allclose(second.server_cycles, second.server_cycles_pred, rtol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="bogus"), "mode='bogus' is invalid"),
    (dict(mode="splitfed", scenario=replace(SC, schedule="sequential")), "mode='splitfed' needs schedule 'parallel'"),
    (dict(mode="splitfed_v1", scenario=replace(SC, schedule="parallel-pipelined")), "needs schedule 'parallel'"),
    (dict(mode="sequential", scenario=SC), "mode='sequential' needs schedule 'sequential'"),
    (dict(mode="sequential", scenario=replace(SC, schedule="pipelined")), "needs schedule 'sequential'"),
    (dict(mode="fedlora", scenario=SC, policies=("CARD",)), "policies=.*mode='fedlora'.*device-only"),
    (dict(mode="splitfed", scenario=SC, backend=object()), "backend=.*mode='splitfed'"),
])
def test_bad_mode_or_mode_schedule_refused_before_training(kwargs, match):
    """Refused by name before any model is touched (the model given here cannot train)."""
    with pytest.raises(InvalidParameterError, match=match):
        emulated_training(model=object(), tokenizer=object(), rounds=1, **kwargs)


def test_summary_totals_round_delays_in_parallel_modes(parallel_run):
    """The run's delay of a parallel mode is the sum over rounds of the slowest device's delay (not of every
    device's), and CARD's delay reduction is taken on it; recomputed here from the per-device rows."""
    from splitlora.emulation.run import emulation_summary

    mode, df, _ = parallel_run
    summary = emulation_summary(df).set_index("policy")
    run = {p: g[g.feasible].groupby("round").delay_s.max().sum() for p, g in df.groupby("policy")}
    for p, total in run.items():
        assert summary.loc[p, "run_delay_s"] == pytest.approx(total, rel=1e-12)
        assert summary.loc[p, "run_delay_s"] < summary.loc[p, "delay_s"]          # M = 2 devices a round
    if "CARD" in run:
        for p, total in run.items():
            assert summary.loc[p, "card_delay_reduction"] == pytest.approx(1 - run["CARD"] / total, rel=1e-12)

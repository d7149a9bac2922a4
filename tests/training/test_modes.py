"""Training modes beside sequential split learning: SplitFed (SFL-V2, SFL-V1) and federated LoRA (issue 13)."""
from __future__ import annotations

import pytest
import torch

from splitlora.errors import InvalidParameterError
from splitlora.training.federated import fedavg, fedavg_payloads
from splitlora.training.split import num_units
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer, unsplit_training
from tests.helpers import tiny_model
from tests.training.test_trainer import lora_config, make_batches

CFG = SplitTrainConfig(lr=1e-2, seed=3)


def assert_same_state(a: dict, b: dict, atol: float):
    assert set(a) == set(b)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= atol, worst


@pytest.mark.parametrize("mode", ["splitfed", "splitfed_v1"])
def test_splitfed_with_one_device_equals_sequential(mode):
    """One device, the cut moving every round (adapter and AdamW state change sides): same losses and adapter."""
    model, lora = tiny_model(), lora_config(True, dropout=0.0)
    L = num_units(model)
    cuts = [[c] for c in (1, L, 0, 2, 2)]
    data = [make_batches(6, seed=5)]
    seq = SplitTrainer(model, lora, CFG)
    seq.run(data, cuts, rounds=5, steps_per_round=2)
    par = SplitTrainer(model, lora, CFG)
    par.run(data, cuts, rounds=5, steps_per_round=2, mode=mode)
    assert [(x.round, x.device, x.cut_layer) for x in par.logs] == [(x.round, x.device, x.cut_layer) for x in seq.logs]
    torch.testing.assert_close(torch.tensor([x.loss for x in par.logs]), torch.tensor([x.loss for x in seq.logs]),
                               rtol=0, atol=1e-6)
    assert_same_state(par.adapter_state(), seq.adapter_state(), 1e-6)
    assert par.logs[-1].loss != par.logs[0].loss


def test_fedavg_of_identical_adapters_is_the_identity():
    g = torch.Generator().manual_seed(0)
    adapter = {f"m{i}": torch.randn(4, 3, generator=g) for i in range(3)}
    copies = [{k: v.clone() for k, v in adapter.items()} for _ in range(4)]
    out = fedavg(copies, [1.0, 7.0, 2.5, 0.5])
    for k in adapter:
        torch.testing.assert_close(out[k], adapter[k], rtol=1e-6, atol=0)
    shared = fedavg([adapter, adapter], [3.0, 1.0])  # the same tensor objects: returned exactly
    assert all(torch.equal(shared[k], adapter[k]) for k in adapter)


def test_heterogeneous_cut_aggregation_averages_each_matrix_over_its_holders():
    """Device 0 cut at block 1 holds block-1 LoRA, device 1 (cut 2) blocks 1-2, device 2 (cut 3) blocks 1-3:
    each matrix is the sample-weighted mean over exactly the devices holding it (hand computation)."""
    g = torch.Generator().manual_seed(1)
    names = ["b1.A", "b1.B", "b2.A", "b2.B", "b3.A"]
    held = {0: names[:2], 1: names[:4], 2: names}
    states = [{n: torch.randn(2, 2, generator=g) for n in held[m]} for m in range(3)]
    w = [10.0, 30.0, 60.0]
    out = fedavg(states, w)
    assert list(out) == names
    for n in names[:2]:
        want = (10 * states[0][n] + 30 * states[1][n] + 60 * states[2][n]) / 100
        torch.testing.assert_close(out[n], want, rtol=1e-6, atol=1e-7)
    for n in names[2:4]:
        torch.testing.assert_close(out[n], (30 * states[1][n] + 60 * states[2][n]) / 90, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["b3.A"], states[2]["b3.A"], rtol=0, atol=0)
    with pytest.raises(InvalidParameterError, match="weights"):
        fedavg(states, [1.0, 2.0])
    with pytest.raises(InvalidParameterError, match="weights"):
        fedavg(states, [1.0, -2.0, 1.0])


def test_splitfed_v1_heterogeneous_cuts_equals_independent_devices_averaged():
    """SFL-V1, one round, devices at cuts 0, 1, 3 with their own data: each device's model equals an independent
    one-device run from the same initial adapter; the global adapter is their sample-weighted mean (every matrix
    is held by each device's model, on its device side or in its server-side copy), AdamW state included."""
    model, lora = tiny_model(), lora_config(True, dropout=0.0)
    cuts = [0, 1, 3]
    data = [make_batches(2, seed=s) for s in (11, 12, 13)]
    weights = [1.0, 2.0, 5.0]
    par = SplitTrainer(model, lora, CFG)
    logs = par.run(data, [cuts], rounds=1, steps_per_round=2, mode="splitfed_v1", sample_weights=weights)
    refs, losses = [], []
    for m in range(3):
        t = SplitTrainer(model, lora, CFG)
        t.run([data[m]], [[cuts[m]]], rounds=1, steps_per_round=2)
        refs.append(t.adapter_state())
        losses.append([x.loss for x in t.logs])
    # round-robin order: step 0 of devices 0, 1, 2, then step 1 of each
    assert [(x.device, x.cut_layer) for x in logs] == [(m, cuts[m]) for _ in range(2) for m in range(3)]
    got = {m: [x.loss for x in logs if x.device == m] for m in range(3)}
    for m in range(3):
        assert got[m] == pytest.approx(losses[m], abs=1e-6)
    state = par.adapter_state()
    for n in state:
        want = sum(w * r[n] for w, r in zip(weights, refs)) / sum(weights)
        torch.testing.assert_close(state[n], want, rtol=1e-5, atol=1e-6)


def test_splitfed_v2_at_cut_0_is_the_server_training_in_round_robin_order():
    """SFL-V2 at c = 0 (no device-side LoRA): the one shared server-side adapter is trained on every device's
    mini-batches in the stated order (all i-th mini-batches in device order before any (i+1)-th), so it equals
    ordinary peft training on that order; SFL-V1 on identical data equals a single device."""
    model, lora = tiny_model(), lora_config(True, dropout=0.0)
    data = [make_batches(2, seed=s) for s in (31, 32, 33)]
    v2 = SplitTrainer(model, lora, CFG)
    logs = v2.run(data, lambda n, m: 0, rounds=2, steps_per_round=2, mode="splitfed")
    order = [data[m][i] for n in range(2) for i in range(2) for m in range(3)]
    ref, ref_losses = unsplit_training(model, lora, order, CFG)
    torch.testing.assert_close(torch.tensor([x.loss for x in logs]), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    assert_same_state(v2.adapter_state(), {n: p for n, p in ref.named_parameters() if p.requires_grad}, 1e-5)
    same = [data[0][:1]] * 2
    v1, one = SplitTrainer(model, lora, CFG), SplitTrainer(model, lora, CFG)
    v1.run(same, [[1, 1]], rounds=1, mode="splitfed_v1")
    one.run(same[:1], [[1]], rounds=1)
    assert v1.logs[0].loss == v1.logs[1].loss
    assert_same_state(v1.adapter_state(), one.adapter_state(), 1e-6)


def test_fedlora_with_one_device_equals_unsplit_peft_training():
    model, lora = tiny_model(), lora_config(True, dropout=0.0)
    data = [make_batches(3, seed=9)]
    par = SplitTrainer(model, lora, CFG)
    logs = par.run(data, [[0]] * 3, rounds=3, mode="fedlora")
    assert {x.cut_layer for x in logs} == {num_units(model)} and all(x.bytes_up == 0 for x in logs)
    ref, ref_losses = unsplit_training(model, lora, data[0], CFG)
    torch.testing.assert_close(torch.tensor([x.loss for x in logs]), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    want = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert_same_state(par.adapter_state(), want, 1e-5)


def test_fedlora_round_is_the_average_of_independent_unsplit_trainings():
    model, lora = tiny_model(), lora_config(True, dropout=0.0)
    data = [make_batches(2, seed=s) for s in (21, 22)]
    par = SplitTrainer(model, lora, CFG)
    par.run(data, lambda n, m: 0, rounds=1, steps_per_round=[2, 1], mode="fedlora", sample_weights=[3.0, 1.0])
    refs = [unsplit_training(model, lora, data[m][:k], CFG)[0] for m, k in ((0, 2), (1, 1))]
    refs = [{n: p for n, p in r.named_parameters() if p.requires_grad} for r in refs]
    want = {n: (3 * refs[0][n] + refs[1][n]) / 4 for n in refs[0]}
    assert_same_state(par.adapter_state(), want, 1e-5)


def test_fedavg_payloads_average_the_adamw_state():
    p = [{"params": {"a": torch.tensor([1.0])}, "opt": {"a": {"step": torch.tensor(2.0), "exp_avg": torch.tensor([0.0])}}},
         {"params": {"a": torch.tensor([3.0])}, "opt": {"a": {"step": torch.tensor(4.0), "exp_avg": torch.tensor([1.0])}}}]
    out = fedavg_payloads(p, [1.0, 1.0])
    assert out["params"]["a"].item() == 2.0 and out["opt"]["a"]["step"].item() == 3.0
    assert out["opt"]["a"]["exp_avg"].item() == 0.5


def test_splitfed_resumes_from_a_round_end_checkpoint(tmp_path):
    model, lora = tiny_model(), lora_config(True, dropout=0.0)
    data = [make_batches(2, seed=s) for s in (1, 2)]
    cuts = [[1, 2], [2, 0], [1, 1]]
    full = SplitTrainer(model, lora, CFG)
    full.run(data, cuts, rounds=3, mode="splitfed")
    ck = tmp_path / "ck.pt"
    part = SplitTrainer(model, lora, CFG)
    part.run(data, cuts, rounds=3, mode="splitfed", checkpoint_path=ck, stop_after=4)
    assert part.global_step == 4
    resumed = SplitTrainer(model, lora, CFG)
    resumed.load_checkpoint(ck)
    resumed.run(data, cuts, rounds=3, mode="splitfed")
    assert [x.loss for x in resumed.logs] == [x.loss for x in full.logs]
    assert_same_state(resumed.adapter_state(), full.adapter_state(), 0.0)


def test_bad_mode_and_counts_are_refused_before_any_step():
    model, lora = tiny_model(), lora_config(True, dropout=0.0)
    data = [make_batches(1, seed=1)] * 2
    t = SplitTrainer(model, lora, CFG)
    with pytest.raises(InvalidParameterError, match="mode='fedsgd' is invalid"):
        t.run(data, [[1, 1]], rounds=1, mode="fedsgd")
    with pytest.raises(InvalidParameterError, match="steps_per_round"):
        t.run(data, [[1, 1]], rounds=1, steps_per_round=[1, 0], mode="splitfed")
    with pytest.raises(InvalidParameterError, match="sample_weights"):
        t.run(data, [[1, 1]], rounds=1, mode="splitfed", sample_weights=[1.0])
    with pytest.raises(InvalidParameterError, match="stop_after"):
        t.run(data, [[1, 1]], rounds=1, mode="splitfed", stop_after=1)
    with pytest.raises(InvalidParameterError, match="sample_weights"):
        t.run(data, [[1, 1]], rounds=1, sample_weights=[1.0, 1.0])
    assert t.global_step == 0 and not t.logs

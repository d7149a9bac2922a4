"""Clear errors naming the file or parameter (issue 11, defects 8 and 9): truncated checkpoint, empty / blank /
non-UTF-8 / runaway-line JSONL, a missing local model path, and peft options split training cannot export refused
when the trainer is built (every option it accepts exports to a standard PEFT adapter)."""
import copy
import time

import pytest
import torch

from splitlora.errors import CorruptFileError, InvalidParameterError
from splitlora.training.data import MAX_LINE_BYTES, load_gsm8k, read_jsonl, validate_jsonl
from splitlora.training.models import load_model_and_tokenizer, resolve_source
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer
from tests.helpers import tiny_model
from tests.training.test_trainer import make_batches

RECORD = '{"question": "1+1?", "answer": "2\\n#### 2"}\n'


# ------------------------------------------------------------------ checkpoints
def test_truncated_checkpoint_names_the_path_and_what_to_do(tmp_path):
    from peft import LoraConfig

    trainer = SplitTrainer(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    trainer.step(make_batches(1, 0)[0], 0, 1)
    ck = trainer.save_checkpoint(tmp_path / "ck.pt")
    data = ck.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match=rf"checkpoint '{bad}' \({cut} bytes\).*truncated or corrupt"
                                                   r".*Move it away") as info:
            trainer.load_checkpoint(bad)
        assert isinstance(info.value, OSError)  # what callers caught before still catches it
    with pytest.raises(FileNotFoundError):
        trainer.load_checkpoint(tmp_path / "absent.pt")


# ------------------------------------------------------------------ data files
@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_jsonl_without_records_is_refused_with_its_path(tmp_path, content):
    p = tmp_path / "train.jsonl"
    p.write_bytes(content)
    for read in (validate_jsonl, read_jsonl, load_gsm8k, lambda q: load_gsm8k(tmp_path)):
        with pytest.raises(InvalidParameterError, match=rf"{p} is invalid: holds no record"):
            read(p)


def test_non_utf8_jsonl_names_path_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(RECORD.encode() + b"\n" + '{"question": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(InvalidParameterError, match=rf"{p}, line 3: not UTF-8 \(byte 0xe9 at column 18\)"):
        read_jsonl(p)


def test_runaway_line_is_refused_while_reading(tmp_path):
    """A 50 MB line is refused after reading MAX_LINE_BYTES of it, before it is decoded, parsed or tokenised."""
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(RECORD.encode())
        f.write(b'{"question": "' + b"x" * (50 * 2**20) + b'", "answer": "1"}\n')
    t0 = time.process_time()
    with pytest.raises(InvalidParameterError, match=rf"{p}, line 2: malformed record \(longer than {MAX_LINE_BYTES}"):
        load_gsm8k(p)
    assert time.process_time() - t0 < 5  # generous: it reads 1 MiB (ms); it took 264 s before


def test_valid_jsonl_reads_as_before(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(RECORD + "\n" + RECORD.replace("1+1", "2+2"))
    ds = read_jsonl(p)
    assert ds.column_names == ["question", "answer"] and ds["question"] == ["1+1?", "2+2?"]
    assert len(read_jsonl(p, limit=1)) == 1 and len(read_jsonl(p, limit=0)) == 0


# ------------------------------------------------------------------ model paths
@pytest.mark.parametrize("name", ["./no_such_model_dir", "/no/such/model", "models/my model", "a/b/c"])
def test_missing_local_model_path_names_it(name):
    with pytest.raises(OSError, match=rf"model_name_or_path='{name}' is invalid: no such folder") as info:
        load_model_and_tokenizer(name)
    assert "Repo id must" not in str(info.value)


def test_offline_hub_id_not_in_cache_is_named(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="'no_such_org/no_such_model' is invalid: .*not in the HF cache"):
        resolve_source("no_such_org/no_such_model")


# ------------------------------------------------------------------ peft options
def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **kw})


@pytest.mark.parametrize("kw,match", [
    ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"), ({"bias": "lora_only"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"), ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"lora_bias": True}, "lora_bias")])
def test_options_that_cannot_export_are_refused_when_built(kw, match):
    model = tiny_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(InvalidParameterError, match=rf"lora_config\.{match}=.* is invalid"):
        SplitTrainer(model, _lora(**kw))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the user's model untouched


@pytest.mark.parametrize("kw", [{"use_rslora": True}, {"init_lora_weights": "gaussian"},
                                {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                                {"layers_to_transform": [0, 2]}, {"exclude_modules": ["layers.1.self_attn.q_proj"]}])
def test_every_accepted_option_exports_a_loadable_adapter(tmp_path, kw):
    """What the trainer accepts trains and exports: the adapter PEFT loads gives the split model's logits."""
    from peft import PeftModel

    model = tiny_model()
    trainer = SplitTrainer(model, _lora(**kw), SplitTrainConfig(lr=2e-2))
    trainer.run([make_batches(1, 0)], [[1]], rounds=1)
    out = trainer.export_adapter(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    ids = make_batches(1, 9)[0]["input_ids"]
    with torch.no_grad():
        dev, srv = trainer.device.part, trainer.server.part
        dev.eval(), srv.eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, srv(dev(ids)), rtol=0, atol=1e-5)
        assert (loaded(input_ids=ids).logits - model(ids).logits).abs().max() > 1e-4

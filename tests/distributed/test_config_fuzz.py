"""Configuration fuzzing (issue 11, defect 3): every field of a run configuration with wrong types and out-of-range
values must be refused by the check that runs before any process starts, with an InvalidParameterError naming the
field, and reach the command line as one line with exit status 2 (no traceback)."""
from __future__ import annotations

import math
import subprocess
from dataclasses import fields

import pytest
import yaml

from splitlora import cli
from splitlora.distributed import config
from splitlora.errors import InvalidParameterError

BASE = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "seed": 0},  # L = 2 blocks
    "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    "train": {"lr": 1e-3, "seed": 0},
    "batch_size": 2, "seq_len": 16, "batches_per_device": 2, "data_seed": 0, "devices": ["Device 3"],
    "rounds": 2, "steps_per_round": 1, "cut": 1, "w": 0.1,
    "link": {"condition": "Normal", "seed": 0, "emulate": False, "rate_scale": 1.0, "rate_source": "model"},
    "dist": {"addr": "127.0.0.1", "port": 29500, "timeout_s": 20, "join_timeout_s": 30, "startup_timeout_s": 60,
             "idle_timeout_s": 60, "retries": 1, "resume": True},
}
NAN = float("nan")
ALL_TIMEOUTS = ("timeout_s", "join_timeout_s", "startup_timeout_s", "idle_timeout_s")

# key (section.field or field) -> bad values; every field of RunConfig, SplitTrainConfig, LinkConfig, DistConfig
# and the LoRA/model keys the runs use. ``yes``/``no`` are strings here (quoted in YAML), as a careless user writes.
BAD = {
    "model": ["tiny", [1], None],
    "model.hidden_size": ["64", 0, -1, 2.5, True, 10**9],
    "model.num_layers": ["2", 0, 1.5],
    "model.num_heads": [3, "4", 0],
    "model.num_kv_heads": [3, 0],
    "model.vocab_size": [0, "259"],
    "model.tie_word_embeddings": ["no", 1],
    "model.seed": ["0", 1.5, -1, True],
    "model.name_or_path": ["/no/such/model", "./no_such_model_dir/", "", 5, None],
    "model.hiden_size": [8],
    "lora": ["r4", None, [4]],
    "lora.r": [-1, 0, "4", 2.5, True, 10**6],
    "lora.lora_alpha": [0, -8, "8", True],
    "lora.lora_dropout": [-0.1, 1.0, "0", True],
    "lora.target_modules": [[], 5, [1], ""],
    "lora.use_dora": [True, "yes"],
    "lora.use_rslora": ["no"],
    "lora.bias": ["all", "lora_only"],
    "lora.init_lora_weights": ["pissa", "olora"],
    "lora.layer_replication": [[[0, 1]]],
    "lora.modules_to_save": [["lm_head"]],
    "lora.rr": [8],
    "train": ["fast", None, [1]],
    "train.lr": [0, -1, "1e-3", True, NAN],
    "train.betas": [[2, 3], [0.9], "0.9", [0.9, 1.0], [-0.1, 0.9], ["0.9", "0.999"]],
    "train.eps": [0, "1e-8", -1.0],
    "train.weight_decay": [-1, "0"],
    "train.granularity": ["layer", 1],
    "train.wire_dtype": ["int8", 32],
    "train.seed": ["0", -1, 1.5, True],
    "train.send_attention_mask": ["no", "yes", 1],
    "train.progress": ["yes", 0],
    "train.compute_dtype": ["float64"],
    "train.lr_": [3],
    "batch_size": [0, "2", 2.5, 10**9, True, -1],
    "seq_len": [0, "16", 10**9, 1024],  # 1024 > the tiny model's max_position_embeddings (512)
    "batches_per_device": [0, 10**9, "4"],
    "data_seed": ["0", -1, 0.5],
    "data": ["/no/such/data.jsonl", 5, "", "no_such_folder"],
    "devices": ["Device 1", [], ["Device 9"], [1], None],
    "rounds": [0, 10**9, "2", 2.0],
    "steps_per_round": [0, 10**9, "1"],
    "cut": [10, -1, "3", [[1]], [[1], [9]], 1.5, True, "cards"],
    "w": [2, -0.1, "0.5", NAN, True, None],
    "card_scenario": ["paper", {"wieght": 1}, {"schedule": "pipelind"}, {"w": 2}, [1], {"w": "0.5"},
                      {"discrete_clocks": "no"}, {"batch_size": "2"}, {"devices": "Device 1"}],
    "link": ["Normal", None],
    "link.condition": ["Bad", 1],
    "link.seed": ["0", -1, 1.5],
    "link.emulate": ["no", "yes", 1],
    "link.rate_scale": [0, -1, "1", 1e12, NAN],
    "link.rate_source": ["measure"],
    "link.rate": [3],
    "dist": ["local", None],
    "dist.addr": ["", 5],
    "dist.port": [0, 70000, "29500", 1.5],
    **{f"dist.{k}": ["20", 0, -1, NAN, 1e12, True] for k in ALL_TIMEOUTS},
    "dist.retries": [-1, "1", 1.5, 10**6],
    "dist.checkpoint_dir": [5, "", True],
    "dist.resume": ["no", 0],
    "dist.checkpoints": ["no", "yes", 1],
    "hardware": [5, "", True, "no-such-hardware.yaml"],
    "server": [5, "", "H200"],
    "mode": ["parallel", "splitfed_v2", "SplitFed", 1, None, ["splitfed"]],
    "dist.secret_file": [5, "", True],
    "dist.output_dir": [5, "", True],
    "dist.device": ["gpu"],
    "dist.backend": ["mpi"],
    "dist.timout_s": [3],
}
# what the error names when the field's leaf name is not enough (a check inside a helper names the argument)
NAMED = {"devices": r"device", "model.hiden_size": r"hiden_size", "card_scenario": r"card_scenario"}


def _with(key: str, value) -> dict:
    d = yaml.safe_load(yaml.safe_dump(BASE))
    *section, leaf = key.split(".")
    (d[section[0]] if section else d)[leaf] = value
    return d


CASES = [(k, v) for k, vals in BAD.items() for v in vals]


def _fuzzed_fields() -> set[str]:
    return {k for k in BAD}


def test_every_field_is_fuzzed():
    """Every field of the configuration's dataclasses has bad values in BAD (a new field needs its own)."""
    want = {f.name for f in fields(config.RunConfig)}
    want |= {f"{s}.{f.name}" for s, cls in (("train", config.SplitTrainConfig), ("link", config.LinkConfig),
                                            ("dist", config.DistConfig)) for f in fields(cls)}
    missing = sorted(want - _fuzzed_fields())
    assert not missing, f"fields without fuzz values: {missing}"


def test_base_configuration_is_valid(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(BASE))
    config.load_config(p, check=True)  # the cases below differ from it in one value only


def _check_before_start(tmp_path, monkeypatch, d, capsys) -> tuple[int, str]:
    """Run ``splitlora train-distributed --config ... --local`` with process creation made to fail: returns the
    exit status and stderr."""
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(d) if d is not None else "")

    def no_process(*a, **k):
        raise AssertionError("a process was started for an invalid configuration")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(InvalidParameterError):
        config.load_config(p, check=True)
    rc = cli.main(["train-distributed", "--config", str(p), "--local"])
    return rc, capsys.readouterr().err


def test_fuzzed_values_are_refused_before_any_process_starts(tmp_path, monkeypatch, capsys):
    """Each bad value alone: InvalidParameterError from the check, then exit status 2 and one line naming it."""
    late, unnamed = [], []
    for key, value in CASES:
        p = tmp_path / "run.yaml"
        p.write_text(yaml.safe_dump(_with(key, value)))
        try:
            config.load_config(p, check=True)
        except InvalidParameterError as err:
            msg = " ".join(str(err).split())
            name = NAMED.get(key, key.split(".")[-1])
            if not __import__("re").search(name, msg):
                unnamed.append((key, value, msg))
            continue
        late.append((key, value))
    refused = len(CASES) - len(late)
    print(f"\nconfiguration fuzzing: {len(BAD)} keys, {len(CASES)} values fuzzed, {refused} refused before start, "
          f"{len(late)} failed late")
    assert not late, f"accepted by the check (would fail late): {late}"
    assert not unnamed, f"refused without naming the key: {unnamed}"


@pytest.mark.parametrize("key,value", [("dist.timeout_s", "20"), ("cut", 10), ("w", 2), ("train.betas", [2, 3]),
                                       ("link.emulate", "no"), ("devices", "Device 1"), ("lora.r", -1),
                                       ("dist.output_dir", 5), ("model.name_or_path", "/no/such/model")])
def test_cli_reports_one_line_exit_2_no_process(tmp_path, monkeypatch, capsys, key, value):
    rc, err = _check_before_start(tmp_path, monkeypatch, _with(key, value), capsys)
    leaf = key.split(".")[-1]
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert leaf in err and "invalid" in err and "must be" in err, err


def test_empty_or_non_mapping_file_is_refused(tmp_path, monkeypatch, capsys):
    rc, err = _check_before_start(tmp_path, monkeypatch, None, capsys)
    assert rc == 2 and "empty" in err and "Traceback" not in err
    rc, err = _check_before_start(tmp_path, monkeypatch, [1, 2], capsys)
    assert rc == 2 and "must be a mapping" in err


def test_yaml_booleans_still_accepted(tmp_path):
    """Unquoted YAML booleans (true/false, and YAML 1.1's yes/no) stay booleans and pass."""
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(BASE).replace("emulate: false", "emulate: no").replace("resume: true", "resume: yes"))
    cfg = config.load_config(p, check=True)
    assert cfg.link.emulate is False and cfg.dist.resume is True
    assert not math.isnan(cfg.w)


@pytest.mark.parametrize("content,msg", [(b"", "holds no record"), (b"\n \n", "holds no record"),
                                         (b'{"question": "caf\xe9", "answer": "1"}\n', "not UTF-8"),
                                         (b'{"question": "q", "answer": "1"}\n' * 3, "holds 3 records, must hold 4")])
def test_data_file_contents_checked_before_start(tmp_path, monkeypatch, capsys, content, msg):
    """A data file that exists but cannot feed the run (2 x 2 records needed) is refused before start too."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    rc, err = _check_before_start(tmp_path, monkeypatch, _with("data", str(data)), capsys)
    assert rc == 2 and msg in err and str(data) in err, err


def test_a_role_started_by_torchrun_reports_one_line_too(tmp_path):
    """``python -m splitlora.distributed`` (what torchrun starts) exits 2 with one line, before it joins anything."""
    import sys

    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(_with("dist.timeout_s", "20")))
    r = subprocess.run([sys.executable, "-m", "splitlora.distributed", "--config", str(p), "--rank", "0",
                        "--world-size", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "dist.timeout_s='20' is invalid: must be a number" in r.stderr

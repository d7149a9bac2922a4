"""Faults that must not lose results (issue 11): a run that trains nothing or less than configured exits non-zero
and leaves earlier outputs as they were; folders that cannot be written and truncated checkpoints are refused
before the first step with their path; the protocol's timeouts, checkpoints and shared secret by default."""
from __future__ import annotations

import concurrent.futures as cf
import io
import os
import re
from pathlib import Path

import pytest
import torch

from splitlora.distributed import config, launch, roles, wire
from splitlora.distributed.parallel_roles import ParallelServer
from splitlora.errors import InvalidParameterError
from splitlora.paths import RUNS_DIR
from tests.distributed.harness import SECRET, base_config

EARLIER = {"adapter.pt": b"earlier adapter", "logs.json": b"[1]", "events.json": b"[2]",
           "adapter/adapter_config.json": b"{}"}


def _earlier_outputs(out: Path) -> None:
    for name, data in EARLIER.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


def _assert_earlier_outputs(out: Path) -> None:
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoint" not in p.parts
            and "incomplete" not in p.parts} == set(EARLIER)
    assert all((out / name).read_bytes() == data for name, data in EARLIER.items())


def test_run_that_trains_nothing_exits_nonzero_and_keeps_earlier_outputs(tmp_path, monkeypatch, capsys):
    """Defect 2: ``data`` names a file that does not exist, so the devices die at start and never join. The server
    waits ``startup_timeout_s``, exits 1 with the reason (or the configuration check refuses the file before any
    process starts), and the earlier run's outputs are left byte for byte."""
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    d = base_config(tmp_path, data=str(tmp_path / "missing.jsonl"), dist={"startup_timeout_s": 0.3})
    out = Path(d["dist"]["output_dir"])
    _earlier_outputs(out)
    try:
        cfg = config.config_from_dict(d)
        with pytest.raises((OSError, ValueError), match="missing.jsonl"):
            roles.Device(cfg, 0)  # the device dies at start
        result = launch.run_role(cfg, 0, 2)
    except ValueError as err:  # refused by the configuration check: also before anything is written
        result = err
    assert result == 1 or "missing.jsonl" in str(result), result
    if result == 1:
        assert "trained 0 of its 4 mini-batches" in capsys.readouterr().err
    _assert_earlier_outputs(out)
    assert not (out / "incomplete").exists()


def test_run_with_skipped_turns_exits_nonzero_and_writes_beside_earlier_outputs(tmp_path, monkeypatch):
    """One of two devices never joins: what device 0 trained goes to ``<output_dir>/incomplete``; the earlier
    outputs stay; RunIncomplete names the skipped turns."""
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    d = base_config(tmp_path, devices=["Device 3", "Device 5"], cut=[[1, 1], [3, 3]],
                    dist={"startup_timeout_s": 1.0, "idle_timeout_s": 20})
    out = Path(d["dist"]["output_dir"])
    _earlier_outputs(out)
    cfg = config.config_from_dict(d)
    server, device = roles.Server(cfg), roles.Device(cfg, 0)
    with cf.ThreadPoolExecutor(2) as ex:
        fs, fd = ex.submit(server.serve), ex.submit(device.serve)
        with pytest.raises(roles.RunIncomplete, match=r"trained 4 of its 8 mini-batches .*\[\(0, 1\), \(1, 1\)\]"):
            fs.result(60)
        assert fd.result(60) == 0
    _assert_earlier_outputs(out)
    adapter = torch.load(out / "incomplete" / "adapter.pt", weights_only=True)
    assert adapter and len((out / "incomplete" / "logs.json").read_text()) > 2


def _unwritable(tmp_path: Path) -> list[Path]:
    """Folders a run cannot write: a path through a regular file, and a read-only folder (as root, whom
    permissions do not stop: a folder under /proc)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if os.geteuid() == 0:
        return [blocker / "out", Path("/proc/splitlora-cannot-write")]
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return [blocker / "out", ro]


def test_unwritable_output_or_checkpoint_folder_is_refused_before_the_first_step(tmp_path, monkeypatch):
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    for bad in _unwritable(tmp_path):
        cfg = config.config_from_dict(base_config(tmp_path, dist={"output_dir": str(bad)}))
        with pytest.raises(InvalidParameterError, match=rf"dist\.output_dir={re.escape(repr(str(bad)))} is invalid: "
                                                        "cannot write there"):
            roles.Server(cfg)
        with pytest.raises(InvalidParameterError, match=r"dist\.output_dir=.* cannot write there"):
            launch.run_role(cfg, 0, 2)  # before the server listens or builds its model
        cfg = config.config_from_dict(base_config(tmp_path, dist={"checkpoint_dir": str(bad)}))
        for make in (lambda: roles.Server(cfg), lambda: roles.Device(cfg, 0)):
            with pytest.raises(InvalidParameterError, match=r"dist\.checkpoint_dir=.* cannot write there"):
                make()


def test_truncated_checkpoint_is_refused_with_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    d = base_config(tmp_path)
    ck = Path(d["dist"]["checkpoint_dir"])
    ck.mkdir(parents=True)
    cfg = config.config_from_dict(d)
    buf = io.BytesIO()
    torch.save({"version": roles.CHECKPOINT_VERSION, "params": {"x": torch.zeros(4096)}}, buf)
    for name, make in (("server.pt", lambda: roles.Server(cfg)), ("device0.pt", lambda: roles.Device(cfg, 0))):
        (ck / name).write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        with pytest.raises(InvalidParameterError, match=rf"checkpoint {re.escape(repr(str(ck / name)))} is invalid: "
                                                        r"it cannot be read .*truncated.*dist\.resume: false"):
            make()
        (ck / name).unlink()


def test_join_timeout_exceeds_timeout_and_checkpoints_are_on_by_default(tmp_path):
    """Defect 4: a device noticing a dropped pair only at its own ``timeout_s`` must find the server still
    waiting; the shipped runs satisfy it. Checkpoints go to the run folder unless turned off."""
    with pytest.raises(ValueError, match=r"dist\.join_timeout_s=10 is invalid with dist\.timeout_s=60: must be "
                                         "greater"):
        config.DistConfig(timeout_s=60, join_timeout_s=10)
    d = config.DistConfig()
    assert d.join_timeout_s > d.timeout_s and d.checkpoints
    for path in sorted(RUNS_DIR.glob("*.yaml")):
        c = config.load_config(path).dist
        assert c.join_timeout_s > c.timeout_s, path
    from splitlora.distributed.plan import run_folders
    cfg = config.config_from_dict(base_config(tmp_path, dist={"checkpoint_dir": None, "output_dir": None}))
    out, ck = run_folders(cfg)
    assert out == Path("splitlora-runs") / f"{cfg.fingerprint():016x}" and ck == out / "checkpoint"
    off = config.config_from_dict(base_config(tmp_path, dist={"checkpoints": False}))
    assert run_folders(off)[1] is None
    with pytest.raises(ValueError, match=r"dist\.checkpoints='no' is invalid: must be a YAML boolean"):
        config.DistConfig(checkpoints="no")


def test_roles_need_the_shared_secret(tmp_path, monkeypatch):
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    cfg = config.config_from_dict(base_config(tmp_path))
    for make in (lambda: roles.Server(cfg), lambda: roles.Device(cfg, 0)):
        with pytest.raises(InvalidParameterError, match="no shared secret: set the environment variable "
                                                        "SPLITLORA_SECRET or dist.secret_file"):
            make()
    monkeypatch.setenv(wire.SECRET_ENV, "short")
    with pytest.raises(InvalidParameterError, match="SPLITLORA_SECRET is invalid: the secret has 5 bytes"):
        roles.Server(cfg)
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    assert wire.load_secret(str(secret)) == SECRET.encode()
    with pytest.raises(InvalidParameterError, match=r"dist\.secret_file='/nonexistent' is invalid: cannot be read"):
        wire.load_secret("/nonexistent")


def test_server_checkpoint_appends_a_turn_and_resume_drops_rows_written_after_it(tmp_path, monkeypatch):
    """Defect 9 (``server.pt``): a turn appends its rows to ``server.logs.jsonl`` / ``server.events.jsonl`` and
    rewrites only the constant-size state; rows appended after the last ``server.pt`` (a crash in between) are
    dropped when the server resumes."""
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    cfg = config.config_from_dict(base_config(tmp_path))
    ck = Path(cfg.dist.checkpoint_dir)
    server, sizes = roles.Server(cfg), []
    for turn in range(4):
        server.logs.append(roles.DistStepLog(turn, 0, 0, 1, 2.5, 0, 0, 0, 0))
        server.event("turn_done", round=0, device=0)
        server.turn += 1
        server.global_step += cfg.steps_per_round  # a turn that trained (a run that trained nothing is not resumed)
        server.checkpoint()
        sizes.append((ck / "server.pt").stat().st_size)
    assert max(sizes) - min(sizes) < 64, sizes  # the state does not grow with the turns
    st = torch.load(ck / "server.pt", weights_only=True)
    assert "logs" not in st and (st["n_logs"], st["n_events"]) == (4, 4)
    with open(ck / "server.logs.jsonl", "a") as f:
        f.write('{"step": 99, "round"')  # a crash while appending the next turn
    resumed = roles.Server(cfg)
    assert [x.step for x in resumed.logs] == [0, 1, 2, 3] and resumed.turn == 4
    assert [e["event"] for e in resumed.events] == ["turn_done"] * 4 + ["resumed"]
    resumed.checkpoint()
    assert len((ck / "server.logs.jsonl").read_text().splitlines()) == 4
    (ck / "server.events.jsonl").write_text("")  # rows the checkpoint counts are missing: refused with its path
    with pytest.raises(InvalidParameterError, match=r"server\.pt.* is invalid: server\.events\.jsonl holds 0 of"):
        roles.Server(cfg)


@pytest.mark.parametrize("mode", ["sequential", "splitfed"])
def test_an_incomplete_run_is_not_resumed_into_ending_again(tmp_path, monkeypatch, capsys, mode):
    """A run that ended incomplete left a checkpoint after its last turn (parallel modes: its last round): the next
    run in the same folder is refused with what to do (it used to resume, skip every turn and end incomplete at once,
    without waiting for devices; a parallel run's checkpoint counts rounds, not turns)."""
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    server = roles.Server if mode == "sequential" else ParallelServer
    # parallel: 2 devices, so that its 2 rounds are fewer than the 4 turns of the same run
    over = {} if mode == "sequential" else {"mode": mode, "devices": ["Device 3", "Device 5"], "cut": [[1, 1], [3, 3]]}
    cfg = config.config_from_dict(base_config(tmp_path, **over, dist={"startup_timeout_s": 0.3}))
    assert launch.run_role(cfg, 0, cfg.num_devices + 1) == 1  # no device ever joins
    n = 2 * 2 * cfg.num_devices  # mini-batches: rounds x steps_per_round x devices
    with pytest.raises(InvalidParameterError, match=rf"incomplete run that ended after every turn \(0 of {n} mini-batches"
                                                    r".*delete .*ck.* or set dist\.resume: false"):
        server(cfg)
    server(config.config_from_dict(base_config(tmp_path, **over, dist={"startup_timeout_s": 0.3, "resume": False})))

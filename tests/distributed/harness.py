"""The multi-process harness of the distributed tests: run configurations, a local cluster of ``python -m
splitlora.distributed`` processes, and the in-process reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitlora.distributed import config, plan, roles, wire
from splitlora.distributed.launch import free_port

B, S, H = 2, 16, 32
RUN_TIMEOUT_S = 150
SECRET = "splitlora-test-secret-0123456789"  # the shared secret of the test runs (SPLITLORA_SECRET)


def base_config(tmp_path: Path, **over) -> dict:
    cfg = {
        "model": {"hidden_size": H, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "seed": 0},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "train": {"lr": 1e-2, "seed": 3, "granularity": "sublayer"},
        "batch_size": B, "seq_len": S, "batches_per_device": 4, "devices": ["Device 3"], "rounds": 2,
        "steps_per_round": 2, "cut": [[1], [3]],
        "dist": {"port": free_port(), "timeout_s": 8, "join_timeout_s": 10, "startup_timeout_s": 120,
                 "idle_timeout_s": 150, "checkpoint_dir": str(tmp_path / "ck"), "output_dir": str(tmp_path / "out")},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def write_config(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "run.json"
    p.write_text(json.dumps(cfg))
    return p


class Cluster:
    """The server and device processes of one run; (re)start a rank, wait with a deadline, show logs on failure."""

    def __init__(self, tmp_path: Path, cfg_path: Path, world: int, prefix=()):
        self.tmp, self.cfg_path, self.world, self.prefix = tmp_path, cfg_path, world, list(prefix)
        self.procs: dict[int, subprocess.Popen] = {}
        self.lives: dict[int, int] = {}

    def start(self, rank: int, kill_at: int | None = None, env: dict | None = None, cfg_path: Path | None = None) -> None:
        extra = env or {}
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(self.world), "PYTHONWARNINGS": "ignore",
               "OMP_NUM_THREADS": "1", wire.SECRET_ENV: SECRET}  # 2-3 processes on 2 cores: one thread each
        env.pop("SPLITLORA_TEST_KILL_AT", None)
        env.pop(wire.FAKE_NCCL_ENV, None)
        env.update(extra)
        if kill_at is not None:
            env["SPLITLORA_TEST_KILL_AT"] = str(kill_at)
        life = self.lives.get(rank, 0)
        self.lives[rank] = life + 1
        log = open(self.tmp / f"rank{rank}.{life}.log", "w")
        self.procs[rank] = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "splitlora.distributed", "--config", str(cfg_path or self.cfg_path)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(roles.__file__).resolve().parents[2])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("rank*.log")))

    def wait(self, timeout_s: float = RUN_TIMEOUT_S, on_exit=None) -> dict[int, int]:
        """Wait for every rank; ``on_exit(rank, code)`` may restart a rank that died. Returns the last exit codes."""
        deadline = time.monotonic() + timeout_s
        handled = set()
        while time.monotonic() < deadline:
            codes = {r: p.poll() for r, p in self.procs.items()}
            for r, c in codes.items():
                if c is not None and (r, self.lives[r]) not in handled:
                    handled.add((r, self.lives[r]))
                    if on_exit is not None:
                        on_exit(r, c)
            if all(p.poll() is not None for p in self.procs.values()):
                return {r: p.returncode for r, p in self.procs.items()}
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"run did not finish within {timeout_s} s\n{self.logs()}")

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(5)


def results(cfg: dict):
    out = Path(cfg["dist"]["output_dir"])
    return (torch.load(out / "adapter.pt", weights_only=True), json.loads((out / "logs.json").read_text()),
            json.loads((out / "events.json").read_text()))


def assert_same_as_in_process(cfg: dict, skip=(), atol: float = 1e-6):
    adapter, logs, _ = results(cfg)
    ref = plan.run_in_process(config.config_from_dict(cfg), skip=skip)
    want = ref.adapter_state()
    assert set(adapter) == set(want)
    for k in want:
        torch.testing.assert_close(adapter[k], want[k], rtol=0, atol=atol)
    assert [(x["round"], x["device"], x["cut_layer"]) for x in logs] == \
        [(x.round, x.device, x.cut_layer) for x in ref.logs]
    torch.testing.assert_close(torch.tensor([x["loss"] for x in logs]), torch.tensor([x.loss for x in ref.logs]),
                               rtol=0, atol=atol)
    return logs, ref

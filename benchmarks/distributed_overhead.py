"""Overhead of split training over torch.distributed, and accuracy of the emulated link (issue 5, "Performance").

1. Overhead: one device and the server as two processes on this host (gloo over 127.0.0.1, link emulation off)
   against the in-process ``SplitTrainer`` on the same configuration: time per mini-batch, distributed /
   in-process. The distributed time is each turn's wall clock on the server (cut and adapter sent, the steps,
   adapter and timings returned) over its steps; the in-process time is the same steps with ``SplitTrainer.step``.
   The first round is warm-up in both. In-process and distributed runs alternate (the machine may be shared) and
   each distributed run is compared with the in-process runs on either side; one torch thread per process by
   default. Target: ratio <= 1.15.
2. Emulated link: the same two processes with the rate limiter on, Markov channel states, rates scaled so that one
   transfer takes 0.1-0.4 s; per channel state, measured transfer time of the smashed data (server clock) and of
   its gradient (device clock) over the predicted bits / rate. Target: within 10%.

Run: ``.venv/bin/python benchmarks/distributed_overhead.py [--smoke]``; writes
``benchmarks/results/distributed_overhead.json`` (with package versions and the git commit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from splitlora.distributed.launch import free_port
from splitlora.distributed.wire import SECRET_ENV

USED_FILES = ["splitlora/distributed.py", "splitlora/wire.py", "splitlora/run_config.py", "splitlora/training.py",
              "splitlora/split.py", "splitlora/models.py", "benchmarks/distributed_overhead.py"]


def _git_state() -> dict:
    from splitlora.paths import REPO_ROOT

    def run(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": run("rev-parse", "HEAD"), "uncommitted_used_files": run("status", "--porcelain", "--", *USED_FILES)}


def _run_distributed(cfg: dict, workdir: Path, timeout_s: float = 900, threads: int = 1) -> tuple[list, list]:
    from splitlora.paths import REPO_ROOT

    cfg = {**cfg, "dist": {**cfg.get("dist", {}), "port": free_port(), "output_dir": str(workdir / "out"),
                           "timeout_s": 120, "join_timeout_s": 150, "startup_timeout_s": 300}}
    path = workdir / "run.json"
    path.write_text(json.dumps(cfg))
    world = len(cfg["devices"]) + 1
    secret = secrets.token_hex(32)  # the run's shared secret (docs/distributed.md, "Security")
    procs = [subprocess.Popen([sys.executable, "-m", "splitlora.distributed", "--config", str(path)], cwd=REPO_ROOT,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "PYTHONWARNINGS": "ignore",
                                   "OMP_NUM_THREADS": str(threads), SECRET_ENV: secret},
                              stdout=subprocess.DEVNULL, stderr=open(workdir / f"rank{r}.log", "w"))
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"distributed run timed out; logs in {workdir}")
    if any(p.returncode for p in procs):
        raise RuntimeError(f"distributed run failed {[p.returncode for p in procs]}; logs in {workdir}")
    out = workdir / "out"
    return json.loads((out / "logs.json").read_text()), json.loads((out / "events.json").read_text())


def _in_process_step_times(cfg: dict) -> list[float]:
    from splitlora.distributed import config, plan
    from splitlora.training.trainer import SplitTrainer

    rc = config.config_from_dict(cfg)
    base = plan.build_base_model(rc)
    trainer = SplitTrainer(base, plan.lora_config(rc), rc.train)
    data, cuts, I = plan.device_batches(rc, base.config.vocab_size), plan.planned_cuts(rc), rc.steps_per_round
    per_round = []
    for n in range(rc.rounds):
        t0 = time.perf_counter()
        for i in range(I):
            trainer.step(data[0][(n * I + i) % len(data[0])], 0, cuts[n][0], n)
        per_round.append((time.perf_counter() - t0) / I)
    return per_round


def main(argv=None) -> dict:
    from importlib.metadata import version

    from splitlora.paths import BENCHMARK_RESULTS_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI check of the script)")
    ap.add_argument("--out", default=str(BENCHMARK_RESULTS_DIR / "distributed_overhead.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every process (both sides)")
    ap.add_argument("--repeats", type=int, default=2, help="distributed runs, each between two in-process runs")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    size = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2) if a.smoke else \
        dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4)
    B, s, rounds, I = (2, 32, 2, 2) if a.smoke else (4, 128, 6, 10)
    base = {"model": {**size, "seed": 0},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"lr": 1e-3, "seed": 0, "granularity": "block"}, "batch_size": B, "seq_len": s,
            "batches_per_device": I, "devices": ["Device 3"], "rounds": rounds, "steps_per_round": I,
            "cut": size["num_layers"] // 2}
    result = {"benchmark": "distributed_overhead", "smoke": a.smoke, "config": base, "threads": torch.get_num_threads(),
              "load_average_at_start": os.getloadavg(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "versions": {p: version(p) for p in ("torch", "transformers", "peft")}, **_git_state()}

    # in-process and distributed runs alternate (P D P D P): this machine may be shared, so each distributed run is
    # compared with the mean of the in-process runs just before and after it
    proc_runs, dist_runs, ratios = [_in_process_step_times(base)], [], []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            logs, events = _run_distributed(base, Path(tmp), threads=a.threads)
        dist_runs.append([e["seconds"] / e["steps"] for e in events if e["event"] == "turn_done"])
        proc_runs.append(_in_process_step_times(base))
        d = statistics.mean(dist_runs[-1][1:])
        p = statistics.mean(proc_runs[-2][1:] + proc_runs[-1][1:])
        ratios.append(d / p)
        print(f"overhead: {d * 1e3:.1f} ms / {p * 1e3:.1f} ms per mini-batch = {d / p:.3f} (target <= 1.15)")
    result["overhead"] = {"ratio": statistics.mean(ratios), "ratios": ratios, "target": 1.15,
                          "distributed_s_per_minibatch_per_round": dist_runs,
                          "in_process_s_per_minibatch_per_round": proc_runs,
                          "smashed_bytes_per_step": logs[0]["smashed_bytes"],
                          "handover_bytes_per_turn": sum(x["handover_bytes"] for x in logs[:I])}

    # emulated link: the smashed data of one step takes 0.1-0.4 s
    emu = {**base, "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "seed": 0},
           "batch_size": 2, "seq_len": 64, "rounds": 4 if a.smoke else 9, "steps_per_round": 2, "cut": 1,
           "link": {"condition": "Markov", "seed": 4, "emulate": True, "rate_scale": 1.5e-2}}
    with tempfile.TemporaryDirectory() as tmp:
        logs, _ = _run_distributed(emu, Path(tmp), threads=a.threads)
    acc = {}
    for st in ("Good", "Normal", "Poor"):
        rows = [x for x in logs if x["channel_state"] == st]
        if not rows:
            continue
        up = [x["t_up_s"] / x["pred_up_s"] for x in rows]
        down = [x["t_down_s"] / x["pred_down_s"] for x in rows]
        acc[st] = {"steps": len(rows), "rate_bps": rows[0]["rate_up_bps"], "bits": 8 * rows[0]["smashed_bytes"],
                   "predicted_s": rows[0]["pred_up_s"], "up_ratio_mean": statistics.mean(up),
                   "up_ratio_max_dev": max(abs(r - 1) for r in up), "down_ratio_mean": statistics.mean(down),
                   "down_ratio_max_dev": max(abs(r - 1) for r in down)}
        print(f"{st:>6}: predicted {rows[0]['pred_up_s'] * 1e3:.0f} ms, measured/predicted up "
              f"{statistics.mean(up):.3f} (max dev {acc[st]['up_ratio_max_dev']:.3f}), down "
              f"{statistics.mean(down):.3f} (max dev {acc[st]['down_ratio_max_dev']:.3f})")
    result["emulated_link"] = {"config": emu, "per_state": acc, "target_max_dev": 0.10}
    result["load_average_at_end"] = os.getloadavg()
    out = Path(a.out)
    if not a.smoke:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

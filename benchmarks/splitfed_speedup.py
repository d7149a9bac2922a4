"""Parallel training modes across processes (issue 13, "Performance"): splitfed's round speed-up, and overhead.

1. Speed-up: ``splitfed`` with K devices as K + 1 processes on this host (link emulation off) against the
   ``sequential`` mode on the same configuration and data (K turns per round, also K + 1 processes). Round time:
   the server's wall clock of a round (``round_done`` seconds; sequential: the sum of the round's ``turn_done``
   seconds); the first round is warm-up. Measured speed-up = sequential / splitfed round time. Prediction: the
   delay model (splitlora.model.system.CostModel) of the same cut, calibrated to this host with the sequential
   run's measured per mini-batch device and server compute times (device FLOP/s = device FLOPs / t_d, server
   clock = server cycles / t_s): K sequential turns (``round_delay_s``) against one parallel round
   (``parallel_round``: the slowest device, the server's clock shared equally). The model assumes every device
   has its own processor: on a host with fewer cores than K + 1 processes the measured speed-up is lower.
2. Overhead: ``splitfed`` and ``fedlora`` with one device as two processes against ``SplitTrainer.run(mode=...)``
   in-process, time per mini-batch (rounds after the first), in-process and distributed runs alternating.
   Target: ratio <= 1.15. Also the distributed round time over the same run's own compute time (device +
   server compute of its mini-batches, as logged): the communication and FedAvg share, which does not depend on
   how fast the (shared) machine computed during one run or the other.

Run: ``nice .venv/bin/python benchmarks/splitfed_speedup.py [--smoke]``; writes
``benchmarks/results/splitfed_speedup.json`` (with package versions, load average and the git commit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_overhead import _git_state, _run_distributed  # noqa: E402  (the same process launcher)


def _in_process_round_times(cfg: dict) -> list[float]:
    """Seconds per mini-batch of each round of ``SplitTrainer.run(mode=cfg['mode'])`` on this configuration."""
    from splitlora.distributed import config, plan
    from splitlora.training.trainer import SplitTrainer

    rc = config.config_from_dict(cfg)
    p = plan.RunPlan.build(rc)
    trainer = SplitTrainer(p.base_model, p.lora, rc.train)
    data, cuts, I = p.device_batches(), p.planned_cuts(), rc.steps_per_round
    out = []
    for n in range(rc.rounds):
        t0 = time.perf_counter()
        trainer.run(data, cuts, n + 1, I, mode=rc.mode)
        out.append((time.perf_counter() - t0) / (I * rc.num_devices))
    return out


def _round_seconds(events: list, mode: str, rounds: int) -> list[float]:
    if mode == "sequential":
        return [sum(e["seconds"] for e in events if e["event"] == "turn_done" and e["round"] == n)
                for n in range(rounds)]
    return [e["seconds"] for e in events if e["event"] == "round_done"]


def predicted_speedup(cfg: dict, t_d: float, t_s: float, K: int) -> dict:
    """The delay model's round times (s) of K sequential turns and of one parallel round at the configuration's
    cut, calibrated to the measured per mini-batch device and server compute times ``t_d``, ``t_s`` (s)."""
    from dataclasses import replace

    from splitlora.distributed import config, plan

    rc = config.config_from_dict({**cfg, "mode": "splitfed"})
    p = plan.RunPlan.build(rc)
    cm, c = p.cost_model, int(cfg["cut"])
    P = cm.device_flops[c] / t_d                 # FLOP/s of this host's device process
    f = cm.server_cycles[c] / t_s                # the "clock" at which the server process runs one step in t_s
    cm = replace(cm, f_max_hz=max(cm.f_max_hz, f))
    R = 1e15                                     # emulation off: loopback, transfer time ~ 0 in the model
    seq = cm.parallel_round(np.full((K, 1), c), f, P, R, R)[0].sum()   # K turns, each alone on the server
    par = cm.parallel_round(np.full((1, K), c), f / K, P, R, R)[0][0]  # K devices at once, equal clock shares
    return {"sequential_round_s": float(seq), "splitfed_round_s": float(par), "speedup": float(seq / par),
            "t_d_s": t_d, "t_s_s": t_s}


def main(argv=None) -> dict:
    from importlib.metadata import version

    from splitlora.paths import BENCHMARK_RESULTS_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI check of the script)")
    ap.add_argument("--out", default=str(BENCHMARK_RESULTS_DIR / "splitfed_speedup.json"))
    ap.add_argument("--devices", type=int, default=2, help="K, devices of the speed-up runs")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    size = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2) if a.smoke else \
        dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4)
    B, s, rounds, I = (2, 32, 2, 2) if a.smoke else (4, 128, 4, 5)
    base = {"model": {**size, "seed": 0},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"lr": 1e-3, "seed": 0, "granularity": "block"}, "batch_size": B, "seq_len": s,
            "batches_per_device": I, "devices": ["Device 3"], "rounds": rounds, "steps_per_round": I,
            "cut": size["num_layers"] // 2}
    result = {"benchmark": "splitfed_speedup", "smoke": a.smoke, "config": base, "threads_per_process": 1,
              "load_average_at_start": os.getloadavg(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "versions": {p: version(p) for p in ("torch", "transformers", "peft")}, **_git_state()}

    # 1. speed-up of a splitfed round over K sequential turns (device-heavy cut: 3/4 of the blocks on the device)
    K = a.devices
    sp = {**base, "devices": ["Device 3"] * K, "cut": 3 * size["num_layers"] // 4}
    runs = {}
    for mode in ("sequential", "splitfed"):
        with tempfile.TemporaryDirectory() as tmp:
            logs, events = _run_distributed({**sp, "mode": mode}, Path(tmp))
        warm_logs = [x for x in logs if x["round"] > 0]
        runs[mode] = {"round_s": _round_seconds(events, mode, rounds), "logs": logs,
                      # per mini-batch compute as each side logged it: longer under splitfed = CPU time-sliced
                      "device_time_s": statistics.mean(x["device_time_s"] for x in warm_logs),
                      "server_time_s": statistics.mean(x["server_time_s"] for x in warm_logs)}
        print(f"{mode}: round times {[round(x, 3) for x in runs[mode]['round_s']]} s", flush=True)
    seq_logs = runs["sequential"]["logs"]
    warm = [x for x in seq_logs if x["round"] > 0]
    t_d = statistics.mean(x["device_time_s"] for x in warm)
    t_s = statistics.mean(x["server_time_s"] for x in warm)
    seq_r, par_r = (statistics.mean(runs[m]["round_s"][1:]) for m in ("sequential", "splitfed"))
    pred = predicted_speedup(sp, t_d, t_s, K)
    result["speedup"] = {"devices": K, "processes": K + 1, "cut": sp["cut"], "measured": seq_r / par_r,
                         "sequential_round_s": seq_r, "splitfed_round_s": par_r,
                         "round_s": {m: runs[m]["round_s"] for m in runs}, "predicted": pred,
                         "compute_s_per_minibatch": {m: {k: runs[m][k] for k in ("device_time_s", "server_time_s")}
                                                     for m in runs},
                         "load_average_after": os.getloadavg()}
    print(f"speed-up K={K}: measured {seq_r / par_r:.3f} ({seq_r:.3f} s / {par_r:.3f} s per round), "
          f"predicted {pred['speedup']:.3f}", flush=True)

    # 2. two-process overhead of the new modes against in-process (P D P per mode)
    result["overhead"] = {}
    for mode in ("splitfed", "fedlora"):
        cfg = {**base, "mode": mode}
        p1 = _in_process_round_times(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            logs, events = _run_distributed(cfg, Path(tmp))
        d_rounds = [x / I for x in _round_seconds(events, mode, rounds)]
        compute = [sum(x["device_time_s"] + x["server_time_s"] for x in logs if x["round"] == n) / I
                   for n in range(rounds)]  # the same run's compute alone: immune to the machine's drift
        p2 = _in_process_round_times(cfg)
        d, p = statistics.mean(d_rounds[1:]), statistics.mean(p1[1:] + p2[1:])
        result["overhead"][mode] = {"ratio": d / p, "target": 1.15, "distributed_s_per_minibatch": d,
                                    "in_process_s_per_minibatch": p, "distributed_rounds": d_rounds,
                                    "in_process_rounds": [p1, p2],
                                    "in_run_ratio": statistics.mean(d_rounds[1:]) / statistics.mean(compute[1:]),
                                    "in_run_compute_s_per_minibatch": compute}
        print(f"overhead {mode}: {d * 1e3:.1f} ms / {p * 1e3:.1f} ms per mini-batch = {d / p:.3f} (target <= 1.15); "
              f"round time / the run's own compute time {result['overhead'][mode]['in_run_ratio']:.3f}", flush=True)
    result["load_average_at_end"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()

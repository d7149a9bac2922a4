"""Overhead of split training: split step time / unsplit step time, per cut layer (issue 3, "Performance").

Same model (Llama architecture, random weights, byte vocabulary), same GSM8K-format batches (the
package's offline default), same seed, in one process: for each cut layer, ordinary peft training of the
unsplit model and split training (``SplitTrainer.step``, fp32 wire) alternate step by step, and the
medians of the timed steps are compared. Target: ratio <= 1.05. Also records the counted training memory
of the device part (``splitlora.training.measure``) against the unsplit model (= the device part at c = L).

Run: ``.venv/bin/python benchmarks/split_overhead.py [--smoke]``; writes
``benchmarks/results/split_overhead.json`` (with package versions and the git commit).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time

import torch

USED_FILES = ["splitlora/" + f for f in ("split.py", "training.py", "models.py", "data.py", "measure.py",
                                         "_validate.py", "paths.py")] + ["benchmarks/split_overhead.py"]


def _git_state() -> dict:
    """The commit and the uncommitted changes (if any) of the files this benchmark runs."""
    from splitlora.paths import REPO_ROOT

    def run(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": run("rev-parse", "HEAD"),
            "uncommitted_used_files": run("status", "--porcelain", "--", *USED_FILES)}


def main(argv=None) -> dict:
    from peft import LoraConfig, get_peft_model

    from splitlora.paths import BENCHMARK_RESULTS_DIR
    from splitlora.training.data import load_gsm8k, tokenize_batches
    from splitlora.training.measure import measure_split_profile
    from splitlora.training.models import byte_tokenizer, model_from_config, tiny_llama_config
    from splitlora.training.trainer import SplitTrainConfig, SplitTrainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (CI check of the script)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side and cut")
    ap.add_argument("--out", default=str(BENCHMARK_RESULTS_DIR / "split_overhead.json"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: process CPU time is not inflated by spinning threads)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    size = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2) if a.smoke else \
        dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4)
    batch_size, seq_len, steps, warmup = (2, 32, 2, 1) if a.smoke else (4, 128, a.steps, 2)
    cfg = tiny_llama_config(**size)
    model = model_from_config(cfg, seed=0)
    batches = tokenize_batches(load_gsm8k(None, limit=batch_size * (steps + warmup)), byte_tokenizer(),
                               batch_size, seq_len, loss_on="all")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    L = cfg.num_hidden_layers
    cuts = sorted({0, L // 4, L // 2, 3 * L // 4, L})
    tcfg = SplitTrainConfig(lr=1e-4, seed=0)

    rows = []
    for cut in cuts:
        torch.manual_seed(tcfg.seed)
        ref = get_peft_model(copy.deepcopy(model), copy.deepcopy(lora))
        ref.train()
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=tcfg.lr,
                                weight_decay=tcfg.weight_decay)
        trainer = SplitTrainer(model, lora, tcfg)
        t_ref, t_split, losses_ref, losses_split, cpu_ref, cpu_split = [], [], [], [], [], []
        for i, b in enumerate(batches):
            def ref_step():
                out = ref(input_ids=b["input_ids"], labels=b["labels"])
                out.loss.backward()
                opt.step()
                opt.zero_grad()
                return out.loss.item()

            def split_step():
                return trainer.step(b, device_id=0, cut_layer=cut)

            # alternate which side goes first, so a slow spell of the shared host hits both alike
            first, second = (ref_step, split_step) if i % 2 == 0 else (split_step, ref_step)
            t0, c0 = time.perf_counter(), time.process_time()
            r1 = first()
            t1, c1 = time.perf_counter(), time.process_time()
            r2 = second()
            t2, c2 = time.perf_counter(), time.process_time()
            if i % 2 == 0:
                loss_ref, log = r1, r2
                dt_ref, dt_split, cp_ref, cp_split = t1 - t0, t2 - t1, c1 - c0, c2 - c1
            else:
                loss_ref, log = r2, r1
                dt_ref, dt_split, cp_ref, cp_split = t2 - t1, t1 - t0, c2 - c1, c1 - c0
            if i >= warmup:
                t_ref.append(dt_ref), t_split.append(dt_split)
                cpu_ref.append(cp_ref), cpu_split.append(cp_split)
            losses_ref.append(loss_ref), losses_split.append(log.loss)
        med_ref, med_split = statistics.median(t_ref), statistics.median(t_split)
        paired = statistics.median(s / r for s, r in zip(t_split, t_ref))
        cpu_paired = statistics.median(s / r for s, r in zip(cpu_split, cpu_ref))
        rows.append(dict(cut_layer=cut, ratio=cpu_paired, unsplit_cpu_step_s=statistics.median(cpu_ref),
                         split_cpu_step_s=statistics.median(cpu_split), unsplit_step_s=med_ref, split_step_s=med_split,
                         wall_ratio=paired, ratio_of_medians=med_split / med_ref,
                         unsplit_min_step_s=min(t_ref), split_min_step_s=min(t_split),
                         ratio_of_minima=min(t_split) / min(t_ref),
                         max_loss_diff=max(abs(x - y) for x, y in zip(losses_ref, losses_split)),
                         smashed_bytes=log.smashed_bytes))
        print(f"cut {cut}: unsplit {med_ref * 1e3:.1f} ms, split {med_split * 1e3:.1f} ms, "
              f"CPU-time ratio {rows[-1]['ratio']:.3f}, "
              f"wall ratio {rows[-1]['wall_ratio']:.3f}")

    mem = measure_split_profile(model=copy.deepcopy(model), cuts=cuts, batch_size=batch_size, seq_len=seq_len,
                                lora_rank=8, lora_alpha=16, repeats=1, warmup=0)
    unsplit_mem = int(mem.loc[mem.cut_layer == L, "device_mem_bytes"].iloc[0])
    for r in rows:
        m = mem.loc[mem.cut_layer == r["cut_layer"]].iloc[0]
        r.update(device_mem_bytes=int(m.device_mem_bytes), server_mem_bytes=int(m.server_mem_bytes),
                 unsplit_mem_bytes=unsplit_mem, device_mem_fraction=int(m.device_mem_bytes) / unsplit_mem)

    import peft
    import transformers

    result = {
        "benchmark": "split_overhead", "smoke": a.smoke,
        "what": "ratio = median over adjacent step pairs of (split / unsplit) process CPU time (robust on a shared "
                "host; wall_ratio: the same with wall-clock time); "
                "split = SplitTrainer.step (fp32 wire, 1 device), unsplit = ordinary peft training; same model, "
                "batches and seed, alternating (and alternating order) in one process",
        "target_ratio_max": 1.05,
        "model": {**size, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings},
        "batch_size": batch_size, "seq_len": seq_len, "timed_steps": steps, "warmup_steps": warmup,
        "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "memory_note": "counted bytes (splitlora.training.measure): params + 3 x LoRA + saved activations + cut tensors",
        "rows": rows,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version(), "machine": platform.machine(),
                "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "load_average_1min_at_end": os.getloadavg()[0], **_git_state()},
    }
    if not a.smoke or a.out != str(BENCHMARK_RESULTS_DIR / "split_overhead.json"):
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        print("wrote", a.out)
    return result


if __name__ == "__main__":
    main()

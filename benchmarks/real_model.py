"""Split training of the real SmolLM2-135M-Instruct against plain peft training of the unsplit model: peak memory
and step time (issue "Fine-tune a real pretrained LLM", targets: peak RSS <= 1.1x, CPU step time <= 1.02x).

- Memory: two fresh processes load the model, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``),
  then one builds a ``SplitTrainer`` (cut 15 of 30 blocks, fp32) and the other ``peft.get_peft_model`` + AdamW, and
  both train the same mini-batches; the peak RSS (VmHWM) of each is compared.
- Time: in one process, one torch thread, split steps and unsplit peft steps alternate (and alternate which goes
  first) on the same mini-batches; the median over step pairs of split / unsplit process CPU time is the ratio.

Run: ``.venv/bin/python benchmarks/real_model.py [--smoke]``; writes ``benchmarks/results/real_model.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

USED_FILES = ["splitlora/" + f for f in ("split.py", "training.py", "models.py", "data.py")] + \
             ["benchmarks/real_model.py"]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _setup(batch_size: int, seq_len: int, n: int):
    from splitlora.training.data import load_gsm8k, tokenize_batches
    from splitlora.training.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m")
    batches = tokenize_batches(load_gsm8k("gsm8k", limit=batch_size * n), tok, batch_size, seq_len, loss_on="all")
    return model, batches


def memory_role(role: str, batch_size: int, seq_len: int, steps: int, cut: int) -> dict:
    """Peak RSS (byte) of building and training one side, after the model is loaded (run in a fresh process)."""
    from peft import LoraConfig, get_peft_model

    from splitlora.training.trainer import SplitTrainConfig, SplitTrainer

    model, batches = _setup(batch_size, seq_len, steps)
    loaded = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    if role == "split":
        trainer = SplitTrainer(model, LoraConfig(**LORA), SplitTrainConfig(lr=1e-4))
        built = _rss_kib("VmRSS")
        for b in batches:
            trainer.step(b, cut_layer=cut)
    else:
        ref = get_peft_model(model, LoraConfig(**LORA))
        ref.train()
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
        built = _rss_kib("VmRSS")
        for b in batches:
            ref(input_ids=b["input_ids"], labels=b["labels"]).loss.backward()
            opt.step()
            opt.zero_grad()
    return dict(role=role, rss_after_load_bytes=loaded * 1024, rss_after_build_bytes=built * 1024,
                peak_rss_bytes=_rss_kib("VmHWM") * 1024)


def step_time(batch_size: int, seq_len: int, steps: int, warmup: int, cut: int) -> dict:
    """Median over adjacent pairs of split / unsplit CPU time per step, one thread, one process."""
    from peft import LoraConfig, get_peft_model

    from splitlora.training.split import shared_weight_copy
    from splitlora.training.trainer import SplitTrainConfig, SplitTrainer

    torch.set_num_threads(1)
    model, batches = _setup(batch_size, seq_len, steps + warmup)
    trainer = SplitTrainer(model, LoraConfig(**LORA), SplitTrainConfig(lr=1e-4))
    torch.manual_seed(0)
    ref = get_peft_model(shared_weight_copy(model), LoraConfig(**LORA))
    ref.train()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def ref_step(b):
        out = ref(input_ids=b["input_ids"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    cpu_s, cpu_r, losses = [], [], []
    for i, b in enumerate(batches):
        order = [("r", ref_step), ("s", lambda b: trainer.step(b, cut_layer=cut).loss)]
        if i % 2:
            order.reverse()
        got = {}
        for k, fn in order:
            c0 = time.process_time()
            got[k] = (fn(b), time.process_time() - c0)
        if i >= warmup:
            cpu_s.append(got["s"][1]), cpu_r.append(got["r"][1])
        losses.append(abs(got["s"][0] - got["r"][0]))
    return dict(ratio=statistics.median(s / r for s, r in zip(cpu_s, cpu_r)),
                split_cpu_step_s=statistics.median(cpu_s), unsplit_cpu_step_s=statistics.median(cpu_r),
                max_loss_diff=max(losses), timed_steps=len(cpu_s))


def main(argv=None) -> dict:
    from splitlora.paths import BENCHMARK_RESULTS_DIR, REPO_ROOT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few short steps (checks the script)")
    ap.add_argument("--role", choices=["split", "unsplit"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(BENCHMARK_RESULTS_DIR / "real_model.json"))
    a = ap.parse_args(argv)
    B, s, steps, warmup, cut = (1, 32, 2, 1, 15) if a.smoke else (2, 160, 8, 2, 15)
    if a.role:
        print(json.dumps(memory_role(a.role, B, s, steps, cut)))
        return {}
    mem = {}
    for role in ("unsplit", "split"):
        out = subprocess.run([sys.executable, __file__, "--role", role] + (["--smoke"] if a.smoke else []),
                             capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        mem[role] = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = mem["split"]["peak_rss_bytes"] / mem["unsplit"]["peak_rss_bytes"]
    print(f"peak RSS split {mem['split']['peak_rss_bytes'] / 2**30:.3f} GiB, unsplit "
          f"{mem['unsplit']['peak_rss_bytes'] / 2**30:.3f} GiB: ratio {ratio:.3f} (target <= 1.1)")
    t = step_time(B, s, steps, warmup, cut)
    print(f"CPU time per step split {t['split_cpu_step_s']:.3f} s, unsplit {t['unsplit_cpu_step_s']:.3f} s: "
          f"ratio {t['ratio']:.4f} (target <= 1.02); largest loss difference {t['max_loss_diff']:.2e}")

    import peft
    import transformers

    git = lambda *args: subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    result = {
        "benchmark": "real_model", "smoke": a.smoke, "model": "smollm2-135m (SmolLM2-135M-Instruct, fp32)",
        "batch_size": B, "seq_len": s, "steps": steps, "cut_layer": cut, "lora": LORA,
        "memory": {**mem, "peak_rss_ratio": ratio, "target_ratio_max": 1.1},
        "time": {**t, "target_ratio_max": 1.02, "threads": 1, "clock": "process CPU time"},
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "load_average_1min_at_end": os.getloadavg()[0], "commit": git("rev-parse", "HEAD"),
                "uncommitted_used_files": git("status", "--porcelain", "--", *USED_FILES)},
    }
    if not a.smoke or a.out != str(BENCHMARK_RESULTS_DIR / "real_model.json"):
        from splitlora.atomic import atomic_write

        atomic_write(a.out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        print("wrote", a.out)
    return result


if __name__ == "__main__":
    main()

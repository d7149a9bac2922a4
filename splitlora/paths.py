"""Every path the package reads or writes, from one place (no paths relative to the working directory).

``REPO_ROOT`` is the folder holding ``splitlora/``; ``DATA_DIR``, ``FIGURES_DIR``, ``NOTEBOOKS_DIR`` and
``BENCHMARK_RESULTS_DIR`` hang off it. ``FIGURES_DIR`` can be redirected with the environment variable
``SPLITLORA_FIGURES_DIR`` (the tests use this to regenerate figures without touching the committed ones).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BENCHMARK_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RUNS_DIR = DATA_DIR / "runs"  # shipped RunConfig files (splitlora.distributed_report.resolve_run_config)
GSM8K_DIR = DATA_DIR / "gsm8k"  # the shipped GSM8K copy (train.jsonl, test.jsonl, LICENSE; MIT)


def figures_dir() -> Path:
    """Folder where notebooks write ``<name>.png/.pdf/.csv/.json``; ``$SPLITLORA_FIGURES_DIR`` overrides."""
    return Path(os.environ.get("SPLITLORA_FIGURES_DIR", REPO_ROOT / "figures"))

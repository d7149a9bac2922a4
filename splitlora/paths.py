"""Every path the package reads or writes, from one place (no paths relative to the working directory).

``DATA_DIR`` is the package data (hardware and channel profiles, model configs, run configurations, the GSM8K copy):
``splitlora/_data``, a link to the repository's ``data/`` that a wheel ships as real files (importlib.resources).
``REPO_ROOT``, ``FIGURES_DIR``, ``NOTEBOOKS_DIR`` and ``BENCHMARK_RESULTS_DIR`` exist in a source checkout only;
``$SPLITLORA_FIGURES_DIR`` redirects the figures (the tests regenerate figures without touching the committed ones).
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(str(files("splitlora") / "_data"))
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BENCHMARK_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
RUNS_DIR = DATA_DIR / "runs"  # shipped RunConfig files (splitlora.distributed.report.resolve_run_config)
GSM8K_DIR = DATA_DIR / "gsm8k"  # the shipped GSM8K copy (train.jsonl, test.jsonl, LICENSE; MIT)


def figures_dir() -> Path:
    """Folder where notebooks write ``<name>.png/.pdf/.csv/.json``; ``$SPLITLORA_FIGURES_DIR`` overrides."""
    return Path(os.environ.get("SPLITLORA_FIGURES_DIR", REPO_ROOT / "figures"))

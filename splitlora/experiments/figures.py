"""Writing a figure with the data behind it and its provenance, atomically.

``save_figure(fig, data, name, parameters)`` writes ``<name>.csv`` (the tidy data), ``<name>.png``,
``<name>.pdf`` and ``<name>.json`` (parameters, package version, git commit, library versions) into
:func:`splitlora.paths.figures_dir`. Every file is written to a temporary file in the same folder and then
renamed over the old one, so an interrupted run never leaves a half-written figure, and a run that fails
before saving leaves the committed figures untouched.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd

from splitlora.atomic import atomic_write
from splitlora.errors import InvalidParameterError
from splitlora.paths import REPO_ROOT, figures_dir

LIBRARIES = ("splitlora", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "torch", "transformers", "peft",
             "datasets", "papermill")
CSV_FLOAT_FORMAT = "%.10g"


def provenance(parameters: dict) -> dict:
    """Parameters, library versions, Python and the git commit (with ``dirty`` = uncommitted changes)."""
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {"parameters": parameters, "versions": versions, "python": platform.python_version(), "git": git_state()}


def git_state() -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the repository holding the package.

    ``dirty`` means uncommitted changes to tracked files outside ``figures/``.
    """
    def run(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        # the figures themselves are what a run rewrites: they do not make the code dirty
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".", ":!figures").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def save_table(data: pd.DataFrame, name: str, out_dir: Path | None = None) -> Path:
    """Write ``data`` to ``<out_dir>/<name>.csv`` atomically (floats with 10 significant digits)."""
    out = Path(out_dir or figures_dir()) / f"{name}.csv"
    atomic_write(out, lambda p: data.to_csv(p, index=False, float_format=CSV_FLOAT_FORMAT))
    return out


def save_figure(fig, data: pd.DataFrame, name: str, parameters: dict, out_dir: Path | None = None) -> dict:
    """Write the figure (PNG at 150 dpi, PDF), its data (CSV) and provenance (JSON).

    Args:
        fig: a matplotlib Figure; data: the tidy table the figure shows; name: file stem, e.g. "fig2_optimal_cut";
        parameters: the notebook's parameters (JSON-serialisable); out_dir: default :func:`figures_dir`.
    Returns:
        {"csv": path, "png": path, "pdf": path, "json": path}.
    Raises:
        ValueError: empty name or one with a path separator.
    """
    if not name or "/" in name or os.sep in name:
        raise InvalidParameterError(f"name={name!r} is invalid: must be a non-empty file stem without path separators")
    out_dir = Path(out_dir or figures_dir())
    paths = {"csv": save_table(data, name, out_dir)}
    for ext, kw in (("png", {"dpi": 150, "metadata": {"Software": None}}),
                    ("pdf", {"metadata": {"CreationDate": None, "Creator": None, "Producer": None}})):
        paths[ext] = out_dir / f"{name}.{ext}"
        atomic_write(paths[ext], lambda p, ext=ext, kw=kw: fig.savefig(p, format=ext, bbox_inches="tight", **kw))
    paths["json"] = out_dir / f"{name}.json"
    text = json.dumps(provenance(dict(parameters)), indent=2, sort_keys=True, default=str)
    atomic_write(paths["json"], lambda p: p.write_text(text + "\n"))
    return paths


def save_text(text: str, filename: str, out_dir: Path | None = None) -> Path:
    """Write ``text`` to ``<out_dir>/<filename>`` atomically (e.g. ``claims.md``)."""
    if not filename or "/" in filename or os.sep in filename:
        raise InvalidParameterError(f"filename={filename!r} is invalid: must be a non-empty file name without path separators")
    out = Path(out_dir or figures_dir()) / filename
    atomic_write(out, lambda p: p.write_text(text))
    return out

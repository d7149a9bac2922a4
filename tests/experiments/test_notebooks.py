"""Every notebook executes under papermill; the analytic ones regenerate exactly the committed CSVs.

The executed count is checked against the count found, so a notebook that is skipped or silently fails
to run makes this test fail. Notebooks write into a temporary figures folder (SPLITLORA_FIGURES_DIR), never
over the committed ``figures/``.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pandas as pd
import pytest

from splitlora.errors import InvalidParameterError
from splitlora.experiments.notebooks import find_notebooks, run_notebooks
from splitlora.paths import REPO_ROOT

pytestmark = pytest.mark.slow

FIGURES = REPO_ROOT / "figures"
#: Deterministic analytic notebooks: run with their full (committed) parameters, CSVs compared.
ANALYTIC = ("claims", "fig1_model_profile", "fig2_optimal_cut", "fig3_policy_comparison", "fig4_convexity",
            "fig5_sensitivity", "fig6_pipelined_schedule", "scale", "channel_dynamics")


def test_notebooks_are_sources_with_parameters_first():
    for nb in find_notebooks():
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert "parameters" in code[0]["metadata"].get("tags", []), f"{nb.name}: first code cell not tagged"
        assert "smoke" in "".join(code[0]["source"]), f"{nb.name}: no smoke parameter"
        assert not any(c.get("outputs") for c in code), f"{nb.name}: committed with outputs"


def test_every_notebook_executes_and_analytic_csvs_match(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLORA_FIGURES_DIR", str(tmp_path))
    found = [p.stem for p in find_notebooks()]
    analytic = [n for n in found if n in ANALYTIC]
    others = [n for n in found if n not in ANALYTIC]
    executed = []
    if analytic:
        executed += run_notebooks(only=analytic, out_dir=tmp_path / "executed").executed
    if others:
        executed += run_notebooks(only=others, smoke=True, out_dir=tmp_path / "executed").executed
    assert sorted(executed) == sorted(found)
    compared = 0
    for csv in sorted(tmp_path.glob("*.csv")):
        stem = csv.stem
        if not any(stem == n or stem.startswith(n.split("_")[0] + "_") for n in analytic):
            continue
        committed = FIGURES / csv.name
        assert committed.exists(), f"{csv.name} regenerated but not committed in figures/"
        pd.testing.assert_frame_equal(pd.read_csv(csv), pd.read_csv(committed), check_exact=False, rtol=1e-9)
        for ext in ("png", "pdf", "json"):
            if (tmp_path / f"{stem}.{ext}").exists():
                assert (FIGURES / f"{stem}.{ext}").exists(), f"{stem}.{ext} not committed"
        compared += 1
    assert compared >= len(analytic)
    assert (tmp_path / "claims.md").read_text() == (FIGURES / "claims.md").read_text()


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_bad_parameter_fails_fast_and_leaves_figures_untouched(tmp_path, monkeypatch):
    figs = tmp_path / "figures"
    shutil.copytree(FIGURES, figs)
    before = _digests(figs)
    monkeypatch.setenv("SPLITLORA_FIGURES_DIR", str(figs))
    with pytest.raises(RuntimeError, match=r"w=2\.0 is invalid: must be in \[0\.0, 1\.0\]"):
        run_notebooks({"w": 2.0}, only=["fig3_policy_comparison"], out_dir=tmp_path / "executed")
    with pytest.raises(InvalidParameterError, match=r"parameters=\['w'\] are invalid: no selected notebook takes"):
        run_notebooks({"w": 0.5}, only=["fig2_optimal_cut"], out_dir=tmp_path / "executed")  # fig2 sweeps weights
    assert _digests(figs) == before


def test_analytic_notebooks_run_on_the_real_model_architecture(tmp_path, monkeypatch):
    """model="smollm2-135m" (data/models/smollm2-135m.json, the architecture real_finetune trains) in every analytic
    notebook: each executes and plans over SmolLM2's 30 blocks."""
    monkeypatch.setenv("SPLITLORA_FIGURES_DIR", str(tmp_path))
    run = run_notebooks({"model": "smollm2-135m", "granularity": "block"}, only=list(ANALYTIC), smoke=True,
                        out_dir=tmp_path / "executed")
    assert sorted(run.executed) == sorted(ANALYTIC)
    fig2 = pd.read_csv(tmp_path / "fig2_optimal_cut.csv")
    assert fig2.max_feasible_cut.max() == 30 and fig2.cut_layer.between(0, 30).all()
    assert json.loads((tmp_path / "fig2_optimal_cut.json").read_text())["parameters"]["model"] == "smollm2-135m"

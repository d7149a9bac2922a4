"""environment.yml installs the same pinned requirements as pyproject.toml; .ci/run runs README's test command."""
from __future__ import annotations

import tomllib

import yaml

from splitlora.paths import REPO_ROOT


def _norm(req: str) -> str:
    return req.replace(" ", "").lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    got = {_norm(r) for r in pip if not r.startswith("-e")}
    assert got == wanted, f"only in environment.yml: {got - wanted}; only in pyproject.toml: {wanted - got}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = [l.strip() for l in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert "make test" in ci and "make test" in readme

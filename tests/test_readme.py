"""The README's Python example runs as written (the real SmolLM2 model and the shipped GSM8K, offline), improves the
held-out answer loss and exports an adapter."""
from __future__ import annotations

import re

from splitlora.paths import REPO_ROOT


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    logs = scope["logs"]
    assert len(logs) == 2 * 2 * 1 and all(l.loss == l.loss for l in logs)  # rounds x devices x steps, no NaN
    assert [l.cut_layer for l in logs] == [20, 10, 20, 10]
    assert scope["after"] < scope["before"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()

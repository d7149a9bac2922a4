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


def test_readme_own_scenario_runs_and_card_equals_the_exhaustive_search(tmp_path, monkeypatch, capsys):
    """"Your own scenario": the hardware file and the Python block run as written; the decisions printed are the
    exhaustive search's over the user's devices and server."""
    import numpy as np

    from splitlora.model.card import exhaustive_search
    from splitlora.model.hardware import load_channel

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own scenario"):readme.index("## Real hardware")]
    (tmp_path / "my_hardware.yaml").write_text(re.findall(r"```yaml\n(.*?)```", section, re.S)[0])
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(re.findall(r"```python\n(.*?)```", section, re.S)[0], "README.md", "exec"), scope)
    sc = scope["sc"]
    assert sc.devices == ("Phone", "Device 5", "Device 1") and "Phone" in capsys.readouterr().out
    model = sc.cost_model()
    assert model.f_max_hz == 2.0e9 and model.kappa == 300 / 2.0e9 ** 3
    P, M = sc.device_arrays()
    assert P[0] == 4.0e12  # the phone's fp16 FLOP/s
    R = np.full(3, load_channel().rate_bps("Normal"))
    got = scope["ex"].optimal_decisions(sc, "Normal", weights=[0.1])
    want = exhaustive_search(model, P, R, R, M, 0.1, clocks_hz=model.clocks_hz)
    np.testing.assert_array_equal(got.cut_layer, want.cut_layer)

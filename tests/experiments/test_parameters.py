"""Notebook parameters: unknown names refused, papermill's string values parsed or refused with a named error."""
from __future__ import annotations

import json
import math

import pytest

from splitlora.errors import InvalidParameterError
from splitlora.experiments.notebooks import find_notebooks, run_notebooks
from splitlora.experiments.parameters import coerce_parameter, declared_parameters, notebook_parameters


def _notebook(tmp_path, params_source, other_source="table = 1\nimport numpy as np\n"):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": params_source,
                     "outputs": [], "execution_count": None},
                    {"cell_type": "code", "metadata": {}, "source": other_source, "outputs": [],
                     "execution_count": None}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "demo.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_declared_parameters_are_the_literals_of_the_tagged_cell(tmp_path):
    path = _notebook(tmp_path, "smoke = False  # c\nw = 0.1\nweights = [0.1, 0.2]\nname = 'x'\ncuts = None\n")
    assert declared_parameters(path) == {"smoke": False, "w": 0.1, "weights": [0.1, 0.2], "name": "x", "cuts": None}


def test_every_shipped_notebook_declares_literal_parameters():
    for nb in find_notebooks():
        declared = declared_parameters(nb)
        assert "smoke" in declared and declared["smoke"] is False, nb.name


def test_unknown_parameter_is_refused_naming_it_and_the_known_ones(tmp_path):
    path = _notebook(tmp_path, "smoke = False\nw = 0.1\n")
    ns = {"smoke": False, "w": 0.1, "schedul": "pipelined", "In": [], "_": None, "np": math,
          "table": 3, "f": print}
    with pytest.raises(InvalidParameterError, match=r"\['schedul'\].*takes only \['smoke', 'w'\]"):
        notebook_parameters(path, ns)
    del ns["schedul"]
    params = notebook_parameters(path, ns)
    assert dict(params) == {"smoke": False, "w": 0.1}
    ns["w"] = 0.3  # a smoke cell shrinking a parameter: the view shows the value that acted
    assert dict(params) == {"smoke": False, "w": 0.3}


def test_strings_from_papermill_are_parsed_into_the_default_kind(tmp_path):
    path = _notebook(tmp_path, "smoke = False\nweights = [0.1, 0.2]\nrounds = 3\nw = 0.1\nname = 'a'\n")
    ns = {"smoke": "true", "weights": "[0.3, 0.4]", "rounds": "7", "w": 1, "name": "[1]"}
    out = notebook_parameters(path, ns)
    assert dict(out) == {"smoke": True, "weights": [0.3, 0.4], "rounds": 7, "w": 1.0, "name": "[1]"}
    assert ns["weights"] == [0.3, 0.4] and isinstance(ns["w"], float)


@pytest.mark.parametrize("name,value,default,allowed", [
    ("weights", "[0.1, 0.2", [0.1], "a list of numbers"),
    ("weights", "0.1", [0.1], "a list of numbers"),
    ("weights", ["a"], [0.1], "a list of numbers"),
    ("rounds", "2.5", 3, "an integer"),
    ("rounds", True, 3, "an integer"),
    ("smoke", "yes please", False, "a boolean"),
    ("w", "high", 0.1, "a number"),
])
def test_values_of_the_wrong_kind_are_refused_with_the_parameter_name(name, value, default, allowed):
    with pytest.raises(InvalidParameterError, match=rf"^{name}=.* is invalid: must be {allowed}"):
        coerce_parameter(name, value, default)


def test_run_notebooks_refuses_a_parameter_no_selected_notebook_takes(tmp_path):
    with pytest.raises(InvalidParameterError, match=r"\['schedul'\].*no selected notebook takes"):
        run_notebooks({"schedul": "pipelined"}, only=["fig2_optimal_cut"], out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before any notebook ran


@pytest.mark.slow
def test_a_notebook_takes_string_lists_server_and_a_user_hardware_file(tmp_path, monkeypatch):
    """fig2 under papermill with list parameters given as strings (as ``-p`` passes them), the second shipped server
    and a user hardware file: the figure's CSV holds the user's device, the weights given, and the decisions of
    CARD on that server (recomputed here without the notebook)."""
    import numpy as np
    import pandas as pd
    import yaml

    from splitlora.experiments.analytic import optimal_decisions
    from splitlora.model.scenario import Scenario

    hw = tmp_path / "hw.yaml"
    hw.write_text(yaml.safe_dump({"devices": {"Phone": {"flops_per_s": 2.0e12, "memory_bytes": 12e9}}}))
    monkeypatch.setenv("SPLITLORA_FIGURES_DIR", str(tmp_path))
    given = {"weights": "[0.2, 0.6]", "devices": "[Phone, Jetson Nano 4GB]", "server": "A100 SXM4 80GB",
             "hardware": str(hw), "granularity": "block"}
    run_notebooks(given, only=["fig2_optimal_cut"], out_dir=tmp_path / "executed")
    table = pd.read_csv(tmp_path / "fig2_optimal_cut.csv")
    assert sorted(set(table.w)) == [0.2, 0.6] and list(dict.fromkeys(table.device)) == ["Phone", "Device 5"]
    want = optimal_decisions(Scenario(devices=("Phone", "Device 5"), server="A100 SXM4 80GB", hardware=str(hw),
                                      granularity="block"), "Normal", weights=[0.2, 0.6])
    np.testing.assert_array_equal(table.cut_layer, want.cut_layer)
    np.testing.assert_allclose(table.frequency_ghz, want.frequency_ghz, rtol=1e-12)
    recorded = json.loads((tmp_path / "fig2_optimal_cut.json").read_text())["parameters"]
    assert recorded["weights"] == [0.2, 0.6] and recorded["server"] == "A100 SXM4 80GB" and "w" not in recorded


def test_a_list_string_for_a_none_default_is_parsed_and_a_broken_cell_is_named(tmp_path):
    assert coerce_parameter("cuts", "[20, 15, 0]", None) == [20, 15, 0]
    assert coerce_parameter("model_name_or_path", "/models/x", None) == "/models/x"  # paths stay strings
    with pytest.raises(InvalidParameterError, match=r"cuts='\[20, 15' is invalid: must be YAML"):
        coerce_parameter("cuts", "[20, 15", None)
    path = _notebook(tmp_path, "smoke = False\nw = (\n")
    with pytest.raises(InvalidParameterError, match=r"demo.ipynb's parameters cell is invalid: a code cell does not parse"):
        declared_parameters(path)

"""Run configurations as a researcher uses them: one place for w, --set, --dry-run, a user hardware file, one-line
errors (tracebacks with --debug). No process is started here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from splitlora import cli
from splitlora.distributed.config import config_from_dict, load_config, parse_set
from splitlora.distributed.launch import dry_run
from splitlora.errors import InvalidParameterError
from splitlora.model.card import exhaustive_search
from splitlora.model.hardware import load_channel
from splitlora.model.scenario import Scenario
from splitlora.paths import RUNS_DIR

SHIPPED = RUNS_DIR / "distributed.yaml"


def test_parse_set_builds_nested_overrides_with_yaml_values():
    assert parse_set(["rounds=2", "dist.timeout_s=5", "link.condition=Poor", "devices=[Device 1, Jetson Nano 4GB]",
                      "hardware=my hw.yaml"]) == {
        "rounds": 2, "dist": {"timeout_s": 5}, "link": {"condition": "Poor"},
        "devices": ["Device 1", "Jetson Nano 4GB"], "hardware": "my hw.yaml"}
    for bad in ("rounds", "=2", "a.b.c=1", "dist.=3"):
        with pytest.raises(InvalidParameterError, match=r"--set .* is invalid: must be key=value"):
            parse_set([bad])


def test_set_equals_editing_the_file(tmp_path):
    raw = yaml.safe_load(SHIPPED.read_text())
    edited = {**raw, "rounds": 1, "link": {**raw["link"], "condition": "Good"}}
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    assert load_config(SHIPPED, overrides=parse_set(["rounds=1", "link.condition=Good"])) == load_config(path)
    with pytest.raises(InvalidParameterError, match=r"--set\['link'\]\['conditon'\] is invalid"):
        load_config(SHIPPED, overrides=parse_set(["link.conditon=Good"]))
    with pytest.raises(InvalidParameterError, match=r"rounds=0 is invalid"):
        load_config(SHIPPED, overrides={"rounds": 0})


def test_w_is_set_in_one_place_and_reaches_card_with_a_card_scenario():
    raw = yaml.safe_load(SHIPPED.read_text())
    with pytest.raises(InvalidParameterError, match=r"card_scenario\.w=0\.9 is invalid: w is set once, at the top"):
        config_from_dict({**raw, "card_scenario": {**raw["card_scenario"], "w": 0.9}})
    plans = {w: dry_run(load_config(SHIPPED, overrides={"w": w, "rounds": 2})) for w in (0.0, 0.9)}
    assert not plans[0.0][["planning_cut", "clock_ghz"]].equals(plans[0.9][["planning_cut", "clock_ghz"]])


@pytest.mark.parametrize("over", [{}, {"w": 0.6, "link": {"condition": "Poor"}}])
def test_dry_run_equals_an_exhaustive_search_of_the_planning_scenario(over):
    """Each planned (cut, clock) is the exhaustive joint search's over the card_scenario's cost model (Llama-3.2-1B,
    32 sub-layer cuts, pipelined) with the run's w and the device's profile and channel rate."""
    cfg = load_config(SHIPPED, overrides=over)
    table = dry_run(cfg)
    assert len(table) == cfg.rounds * cfg.num_devices
    model = Scenario(**cfg.card_scenario, w=cfg.w).cost_model()
    P, M = Scenario(devices=cfg.devices).device_arrays()
    R = np.array([load_channel().rate_bps(s) for s in table.channel_state])
    ex = exhaustive_search(model, P[table.device], R, R, M[table.device], cfg.w, clocks_hz=model.clocks_hz)
    np.testing.assert_array_equal(table.planning_cut, ex.cut_layer)
    np.testing.assert_allclose(table.clock_ghz, ex.frequency_hz / 1e9, rtol=1e-12)
    np.testing.assert_allclose(table.delay_s, ex.delay_s, rtol=1e-9)
    np.testing.assert_allclose(table.energy_j, ex.energy_j, rtol=1e-9)
    assert (table.cut_layer == np.round(ex.cut_layer * 4 / 32)).all()  # scaled to the trained model's L = 4


def test_user_hardware_in_a_run_configuration(tmp_path):
    hw = tmp_path / "hw.yaml"
    hw.write_text(yaml.safe_dump({"devices": {"Phone": {"flops_per_s": 3e12, "memory_bytes": 12e9}}}))
    cfg = load_config(SHIPPED, overrides={"hardware": str(hw), "devices": ["Phone", "Jetson AGX Orin 64GB"],
                                          "rounds": 1, "server": "A100 SXM4 80GB"})
    table = dry_run(cfg)
    sc = Scenario(**cfg.card_scenario, w=cfg.w, hardware=str(hw), devices=("Phone", "Device 1"), server="A100 SXM4 80GB")
    P, M = sc.device_arrays()
    assert P[0] == 3e12
    R = np.array([load_channel().rate_bps(s) for s in table.channel_state])
    model = sc.cost_model()
    assert model.f_max_hz == 1.41e9
    ex = exhaustive_search(model, P, R, R, M, cfg.w, clocks_hz=model.clocks_hz)
    np.testing.assert_array_equal(table.planning_cut, ex.cut_layer)
    with pytest.raises(InvalidParameterError, match=r"devices='Tablet' is invalid"):
        dry_run(load_config(SHIPPED, overrides={"hardware": str(hw), "devices": ["Tablet", "Phone"]}))
    with pytest.raises(InvalidParameterError, match=r"card_scenario\.hardware=.* is invalid: hardware is set once"):
        load_config(SHIPPED, overrides={"card_scenario": {"hardware": str(hw)}})


def test_cli_dry_run_prints_the_plan_and_errors_are_one_line(capsys):
    assert cli.main(["train-distributed", "--config", str(SHIPPED), "--dry-run", "--set", "rounds=1"]) == 0
    out = capsys.readouterr().out
    assert "planning_cut" in out and "Device 2" in out and "nothing was started" in out
    assert cli.main(["train-distributed", "--config", str(SHIPPED), "--dry-run", "--set", "w=2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "splitlora train-distributed: error: w=2 is invalid: must be a number in [0.0, 1.0]"
    with pytest.raises(InvalidParameterError, match="w=2"):
        cli.main(["--debug", "train-distributed", "--config", str(SHIPPED), "--dry-run", "--set", "w=2"])

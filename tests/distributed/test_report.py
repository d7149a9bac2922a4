"""The shipped run configuration run both ways (splitlora.distributed.report): distributed (server + 2 device
processes on 127.0.0.1, emulated Markov link) and in-process give the same losses; the emulated link delivers the
model's 8 S / R per channel state; bad names and overrides fail with clear messages.

One distributed run (3 processes, about 20-30 s on a 2-core CPU); everything else is in-process and fast.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from splitlora.distributed import report as dr
from splitlora.distributed.config import config_from_dict
from splitlora.distributed.plan import run_in_process
from splitlora.model.hardware import CHANNEL_STATES
from splitlora.paths import RUNS_DIR

SHIPPED = RUNS_DIR / "distributed.yaml"
# 3 rounds of the shipped Markov chain (seed 5) visit Poor, Normal and Good; rate_scale 0.04 stretches one step's
# 64 KiB of smashed data to 79 ms (Good) .. 319 ms (Poor), so wake-up latencies of a few ms stay below 10%
OVERRIDES = {"rounds": 3, "link": {"rate_scale": 0.04}}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return dr.compare_with_in_process("distributed", OVERRIDES, workdir=tmp_path_factory.mktemp("dist"))


def test_shipped_config_is_complete_and_leaves_outputs_to_the_caller():
    raw = yaml.safe_load(SHIPPED.read_text())
    assert "output_dir" not in raw["dist"] and "checkpoint_dir" not in raw["dist"]
    cfg = config_from_dict(raw)
    assert cfg.link.emulate and cfg.link.condition == "Markov" and cfg.cut == "card" and cfg.num_devices == 2
    assert dr.resolve_run_config("distributed") == dr.resolve_run_config("distributed.yaml") == SHIPPED.resolve()
    assert dr.resolve_run_config(str(SHIPPED)) == SHIPPED.resolve()
    assert "distributed.yaml" in dr.available_run_configs()


def test_distributed_losses_equal_an_independent_in_process_run(table):
    raw = yaml.safe_load(SHIPPED.read_text())  # the overrides applied by hand, not by distributed_report
    raw["rounds"] = 3
    raw["link"]["rate_scale"] = 0.04
    ref = run_in_process(config_from_dict(raw)).logs
    assert list(table.columns) == list(dr.TABLE_COLUMNS)
    assert len(table) == len(ref) == 3 * 2 * 2  # rounds x devices x steps_per_round
    assert (table.loss_abs_diff == 0).all()
    assert table.loss_distributed.tolist() == [x.loss for x in ref]  # exactly, not approximately
    assert table.cut_layer.tolist() == [x.cut_layer for x in ref]
    # CARD's cut differs between the devices and, for Device 1, between rounds (with its channel state)
    cuts = table.groupby("device_name").cut_layer.unique()
    assert set(cuts["Device 2"]) == {1} and set(cuts["Device 1"]) == {2, 3}
    assert set(table.channel_state) == set(CHANNEL_STATES)
    # 64 KiB of bfloat16 smashed data per step = the profile's S(c); the prediction is 8 S / R at the emulated rate
    assert (table.smashed_bytes == 4 * 128 * 64 * 2).all() and (table.smashed_bytes == table.model_smashed_bytes).all()
    np.testing.assert_allclose(table.pred_up_s, 8 * table.smashed_bytes / table.rate_up_bps, rtol=1e-12)
    assert table.attrs["distributed_wall_s"] > 0


def test_emulated_link_matches_the_model_per_channel_state(table):
    acc = dr.transfer_accuracy(table)
    assert acc.channel_state.tolist() == list(CHANNEL_STATES)
    assert acc.steps.sum() == len(table)
    # this machine is noisy (shared cores): the mean per state, not every step
    for row in acc.itertuples():
        assert abs(row.mean_ratio - 1) < 0.15, acc
        assert row.worst_abs_rel_err >= row.mean_abs_rel_err >= 0


def test_transfer_accuracy_leaves_out_steps_with_nothing_sent():
    t = pd.DataFrame({"channel_state": ["Poor", "Good", "Good", "Poor"],
                      "t_up_over_pred": [1.2, 0.9, math.nan, 1.0]})
    acc = dr.transfer_accuracy(t)
    assert acc.channel_state.tolist() == ["Good", "Poor"] and acc.steps.tolist() == [1, 2]
    np.testing.assert_allclose(acc.mean_ratio, [0.9, 1.1])
    np.testing.assert_allclose(acc.mean_abs_rel_err, [0.1, 0.1])
    np.testing.assert_allclose(acc.worst_abs_rel_err, [0.1, 0.2])
    with pytest.raises(ValueError, match="t_up_over_pred"):
        dr.transfer_accuracy(pd.DataFrame({"channel_state": ["Good"]}))


def test_unknown_config_and_bad_overrides_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"config='nope' is invalid: .*'distributed\.yaml'") as err:
        dr.resolve_run_config("nope")
    assert str(RUNS_DIR) in str(err.value)
    with pytest.raises(ValueError, match="config="):
        dr.resolve_run_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"overrides\['roundz'\] is invalid.*'rounds'"):
        dr.run_config_dict("distributed", {"roundz": 1})
    with pytest.raises(ValueError, match=r"overrides\['link'\]\['rate_scal'\] is invalid.*'rate_scale'"):
        dr.run_config_dict("distributed", {"link": {"rate_scal": 0.5}})
    with pytest.raises(ValueError, match=r"link\.rate_scale=-1"):
        dr.run_config_dict("distributed", {"link": {"rate_scale": -1}})
    with pytest.raises(ValueError, match=r"overrides\['dist'\]\['port'\] is invalid"):
        dr.run_distributed_local("distributed", {"dist": {"port": 1234}}, workdir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was started or written
    # nested dicts are merged, the rest of the section kept
    merged = dr.run_config_dict("distributed", {"rounds": 1, "link": {"rate_scale": 0.5}})
    raw = yaml.safe_load(SHIPPED.read_text())
    assert merged["rounds"] == 1 and merged["link"] == {**raw["link"], "rate_scale": 0.5}
    assert merged["model"] == raw["model"]

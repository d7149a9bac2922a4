"""Bad input gets a clear error naming the parameter, its value and what is allowed."""
from __future__ import annotations

import numpy as np
import pytest

from splitlora import ChannelSpec, ServerSpec, card, load_device
from splitlora.experiments.analytic import optimal_decisions
from splitlora.model.scenario import Scenario
from tests.helpers import random_instance

GOOD_CHANNEL = dict(bandwidth_hz=20e6, snr_db={"Good": 25, "Normal": 15, "Poor": 5},
                    transition=((0.7, 0.2, 0.1), (0.2, 0.6, 0.2), (0.1, 0.2, 0.7)))
GOOD_SERVER = dict(board="x", cuda_cores=4352, utilisation=0.4, f_min_hz=0.21e9, f_max_hz=2.535e9,
                   clock_step_hz=15e6, board_power_w=165.0)


def test_cut_layer_out_of_range():
    model, P, Ru, Rd, M, w = random_instance(0, k=1)
    with pytest.raises(ValueError, match=rf"cut_layer={model.n_cuts + 1}.*integer in \[0, {model.n_cuts}\]"):
        model.evaluate(np.array([model.n_cuts + 1]), np.array([model.f_max_hz]), P, Ru, Rd)
    with pytest.raises(ValueError, match=r"cut_layer=.*integer in \[0, "):
        model.evaluate(np.array([-1]), np.array([model.f_max_hz]), P, Ru, Rd)


@pytest.mark.parametrize("w", [-0.01, 1.01, float("nan"), float("inf")])
def test_weight_outside_unit_interval(w):
    with pytest.raises(ValueError, match=r"w=.* is invalid: must be in \[0.0, 1.0\]"):
        Scenario(w=w)


def test_f_min_above_f_max():
    with pytest.raises(ValueError, match=r"f_min_hz=3000000000.0 is invalid: must be <= f_max_hz=2535000000.0"):
        ServerSpec.from_datasheet(**dict(GOOD_SERVER, f_min_hz=3e9))


def test_clock_outside_range_is_rejected():
    model, P, Ru, Rd, M, w = random_instance(0, k=1)
    with pytest.raises(ValueError, match=r"f_hz=.* is invalid: must be in \["):
        model.evaluate(np.array([0]), np.array([model.f_max_hz * 2]), P, Ru, Rd)


@pytest.mark.parametrize("bw", [0.0, -1e6, float("nan")])
def test_non_positive_bandwidth(bw):
    with pytest.raises(ValueError, match=r"bandwidth_hz=.* is invalid: must be"):
        ChannelSpec(**dict(GOOD_CHANNEL, bandwidth_hz=bw))


def test_bad_transition_matrix():
    with pytest.raises(ValueError, match=r"transition=.* 3x3 row-stochastic"):
        ChannelSpec(**dict(GOOD_CHANNEL, transition=((0.5, 0.5, 0.5),) * 3))


def test_unknown_device_name():
    with pytest.raises(ValueError, match=r"device='Jetson Thor' is invalid: must be one of \['Device 1'"):
        load_device("Jetson Thor")
    with pytest.raises(ValueError, match=r"devices='Device 9' is invalid: must be one of"):
        Scenario(devices=("Device 1", "Device 9"))


def test_unknown_channel_state():
    with pytest.raises(ValueError, match=r"channel_state='Fair' is invalid: must be one of \['Good', 'Normal', 'Poor'\]"):
        optimal_decisions(channel_state="Fair")


@pytest.mark.parametrize("field", ["device_flops_per_s", "rate_up_bps", "memory_bytes"])
def test_nan_parameters(field):
    model, P, Ru, Rd, M, w = random_instance(0, k=2)
    args = dict(device_flops_per_s=P, rate_up_bps=Ru, rate_down_bps=Rd, memory_bytes=M)
    args[field] = np.array([1.0, np.nan])
    with pytest.raises(ValueError, match=rf"{field}=.* is invalid: must be .*"):
        card(model, w=w, **args)


@pytest.mark.parametrize("kw, name", [({"batch_size": 0}, "batch_size"), ({"granularity": "layer"}, "granularity"),
                                      ({"compute_scale": -1.0}, "compute_scale"), ({"seq_len": 2.5}, "seq_len"),
                                      ({"schedule": "async"}, "schedule")])
def test_scenario_fields(kw, name):
    with pytest.raises(ValueError, match=rf"{name}=.* is invalid"):
        Scenario(**kw)

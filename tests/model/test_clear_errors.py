"""Inputs that gave raw numpy errors or silently wrong results (issue 11, defects 8 and 9) are refused with an
InvalidParameterError naming the parameter, before any computation."""

import numpy as np
import pytest
import yaml

from splitlora.errors import InvalidParameterError
from splitlora.experiments.analytic import optimal_decisions, weight_sensitivity
from splitlora.model.card import card, exhaustive_search
from splitlora.model.hardware import ServerSpec, load_hardware
from splitlora.model.scenario import Scenario
from tests.helpers import random_instance


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_card_refuses_a_bad_chunk(chunk):
    model, P, Ru, Rd, M, w = random_instance(0)
    for fn in (card, exhaustive_search):
        with pytest.raises(InvalidParameterError, match=r"chunk=.* is invalid: must be an integer in \[1, "):
            fn(model, P, Ru, Rd, M, w, chunk=chunk)


@pytest.mark.parametrize("arg", ["device_flops_per_s", "rate_up_bps", "rate_down_bps", "memory_bytes"])
def test_card_refuses_empty_or_string_inputs(arg):
    model, P, Ru, Rd, M, w = random_instance(0)
    base = dict(device_flops_per_s=P, rate_up_bps=Ru, rate_down_bps=Rd, memory_bytes=M)
    for bad, msg in (([], "must hold at least one device-round"), (["1e12"] * len(P), "must be a real number")):
        for fn in (card, exhaustive_search):
            with pytest.raises(InvalidParameterError, match=rf"{arg}=.* is invalid: {msg}"):
                fn(model, **{**base, arg: bad}, w=w)


@pytest.mark.parametrize("w", ["0.5", True, None, [0.5, 0.2]])
def test_card_refuses_a_weight_that_is_not_one_number(w):
    model, P, Ru, Rd, M, _ = random_instance(0)
    with pytest.raises(InvalidParameterError, match=r"w=.* is invalid"):
        card(model, P, Ru, Rd, M, w)


@pytest.mark.parametrize("clocks", [[-1e9, 1e9], [np.nan, 1e9], [0.0, 1e9], [np.inf], []])
def test_exhaustive_search_refuses_clocks_that_are_not_positive(clocks):
    """A negative clock gave a negative delay, a NaN clock 'infeasible': both are refused."""
    model, P, Ru, Rd, M, w = random_instance(1)
    with pytest.raises(InvalidParameterError, match=r"clocks_hz=.* is invalid"):
        exhaustive_search(model, P, Ru, Rd, M, w, clocks_hz=clocks)
    d = exhaustive_search(model, P, Ru, Rd, M, w, clocks_hz=[1e9])  # a valid grid still works
    assert np.all(d.delay_s[d.feasible] > 0)


@pytest.mark.parametrize("cores", [0, -2048, 2048.5, True])
def test_server_needs_positive_cuda_cores(cores, tmp_path):
    """A server with cuda_cores <= 0 was feasible with NaN or negative energy: refused, from Python and from YAML."""
    with pytest.raises(InvalidParameterError, match=r"cuda_cores=.* is invalid: must be an integer"):
        ServerSpec.from_datasheet("x", cores, 0.4, 0.21e9, 2.535e9, 15e6, 165.0)
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump({"servers": {"S": {"cuda_cores": cores, "clocks_hz": [1e9], "kappa": 1e-26}}}))
    with pytest.raises(InvalidParameterError, match=r"cuda_cores=.* is invalid: must be an integer"):
        load_hardware(path)


def test_scenario_devices_must_be_a_list_not_a_name():
    with pytest.raises(InvalidParameterError, match=r"devices='Device 1' is invalid: must be a list of device names"):
        Scenario(devices="Device 1")


@pytest.mark.parametrize("weights", [[], (), "0.5", [0.1, "0.2"], [1.5]])
def test_notebook_weights_refused_before_computation(weights):
    for fn in (optimal_decisions, weight_sensitivity):
        with pytest.raises(InvalidParameterError, match=r"weights=.* is invalid"):
            fn(weights=weights)

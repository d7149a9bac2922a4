"""Fleets drawn from the device profiles and the scale notebook's tables, checked against brute force."""
import numpy as np
import pytest

from splitlora.errors import InvalidParameterError
from splitlora.experiments.analytic import _rounds
from splitlora.experiments.scale import memory_table, scale_table
from splitlora.model.card import exhaustive_search
from splitlora.model.fleet import draw_fleet
from splitlora.model.hardware import load_devices
from splitlora.model.profile import profile_model
from splitlora.model.scenario import Scenario, channel_states


def test_fleet_is_seeded_and_drawn_from_every_profile():
    a, b, c = draw_fleet(1000, seed=1), draw_fleet(1000, seed=1), draw_fleet(1000, seed=2)
    assert a == b and a != c and len(a) == 1000
    names, counts = np.unique(a, return_counts=True)
    assert list(names) == list(load_devices())
    assert counts.min() > 150 and counts.max() < 250  # uniform: 200 each, 4 sigma ~ 50
    assert set(draw_fleet(50, profiles=["Device 5", "Device 1"])) == {"Device 1", "Device 5"}
    Scenario(devices=a)  # usable as a scenario's devices


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_devices=0), r"num_devices=0 is invalid"),
    (dict(num_devices=3, profiles=["Phone"]), r"profiles='Phone' is invalid"),
    (dict(num_devices=3, profiles=[]), r"profiles=\[\] is invalid"),
])
def test_fleet_bad_input(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        draw_fleet(**kwargs)


def test_scale_table_equals_exhaustive_search():
    sc = Scenario(granularity="block")
    rounds, n = 4, 10
    table = scale_table(sc, models=("llama-3.2-1b",), fleet_sizes=(n,), rounds=rounds, seed=3)
    fleet = Scenario(granularity="block", devices=draw_fleet(n, seed=3))
    model = fleet.cost_model()
    ex = exhaustive_search(model, *_rounds(fleet, channel_states("Markov", rounds, n, 3)), sc.w)
    row = table.iloc[0]
    L = model.n_cuts
    assert row.n_cuts == L == 16 and row.device_rounds == rounds * n
    assert row.mean_cut_fraction == pytest.approx(ex.cut_layer.mean() / L)
    assert row.server_only_fraction == pytest.approx(np.mean(ex.cut_layer == 0))
    assert row.device_only_fraction == pytest.approx(np.mean(ex.cut_layer == L))
    assert row.round_delay_s == pytest.approx(ex.delay_s.sum() / rounds, rel=1e-9)
    assert row.round_energy_j == pytest.approx(ex.energy_j.sum() / rounds, rel=1e-9)


def test_memory_table_against_the_profile():
    table = memory_table(Scenario(), models=("llama-3.1-70b",))
    p = profile_model("llama-3.1-70b", batch_size=4, seq_len=512, granularity="sublayer")
    assert (table.n_cuts == 160).all()
    for _, r in table.iterrows():
        budget = load_devices()[r.device].training_memory_bytes
        fits = np.flatnonzero(p.device_memory_bytes <= budget)
        assert r.max_feasible_cut == (fits.max() if fits.size else -1)
        assert r.holds_any_cut == bool(fits.size)
        assert r.card_cut <= r.max_feasible_cut
    # a Jetson Nano's 2.5 GB holds only the embedding (2.10 GB) of the 70B model
    assert table.set_index("board").loc["Jetson Nano 4GB", "max_feasible_cut"] == 0

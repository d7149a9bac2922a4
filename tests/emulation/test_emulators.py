"""Device, channel and server emulation, and the end-to-end emulated run (issue 4).

Expected values are computed here from the YAML numbers and textbook formulas, not with the code under test.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from splitlora.emulation.emulators import (DeviceMemoryError, EmulatedChannel, EmulatedDevice,  # noqa: E402
                                           ServerClock, kappa_calibration)
from splitlora.model.hardware import load_channel, load_devices, load_server  # noqa: E402
from splitlora.model.scenario import Scenario  # noqa: E402
from splitlora.paths import DATA_DIR  # noqa: E402


def _yaml(name):
    raw = yaml.safe_load((DATA_DIR / name).read_text())
    return raw


def _v(x):
    return x["value"] if isinstance(x, dict) else x


# ------------------------------------------------------------------------------------------ channel
def test_channel_reproducible_by_seed_and_matches_simulate():
    spec = load_channel()
    a = EmulatedChannel(spec, 4, seed=7).run(300)
    b = EmulatedChannel(spec, 4, seed=7).run(300)
    c = EmulatedChannel(spec, 4, seed=8).run(300)
    assert a.shape == (300, 4)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(a, spec.simulate(300, 4, seed=7))


def test_channel_transition_frequencies_close_to_matrix():
    P = np.array(_v(_yaml("channel.yaml")["transition"]), dtype=float)
    states = EmulatedChannel(load_channel(), 8, seed=3, initial="Poor").run(5000)
    assert (states[0] == 2).all()
    counts = np.zeros((3, 3))
    for m in range(states.shape[1]):
        np.add.at(counts, (states[:-1, m], states[1:, m]), 1)
    freq = counts / counts.sum(1, keepdims=True)
    # ~13000 transitions per row: binomial standard error <= 0.0045; 0.02 is > 4 sigma
    np.testing.assert_allclose(freq, P, atol=0.02)


@pytest.mark.parametrize("state", ["Good", "Normal", "Poor"])
def test_transfer_time_is_bits_over_rate(state):
    raw = _yaml("channel.yaml")
    W, snr_db = float(_v(raw["bandwidth_hz"])), float(_v(raw["snr_db"][state]))
    rate = W * np.log2(1 + 10 ** (snr_db / 10))
    ch = EmulatedChannel(load_channel(), 2, seed=0, initial=state)
    assert ch.state_name(1) == state
    assert ch.rate_bps(1) == pytest.approx(rate, rel=1e-12)
    assert ch.transfer_time_s(3.2e6, 1) == pytest.approx(3.2e6 / rate, rel=1e-12)
    assert ch.transfer(1000, 0) == pytest.approx(8000 / rate, rel=1e-12)
    assert ch.transfer_time_s(0, 0) == 0.0
    with pytest.raises(ValueError, match="device"):
        ch.rate_bps(2)


def test_real_time_channel_sleeps_for_the_transfer():
    ch = EmulatedChannel(load_channel(), 1, seed=0, initial="Poor", real_time=True)
    n_bytes = 0.05 * ch.rate_bps(0) / 8  # 50 ms
    t0 = time.perf_counter()
    t = ch.transfer(n_bytes, 0)
    assert t == pytest.approx(0.05)
    assert time.perf_counter() - t0 >= 0.049


# ------------------------------------------------------------------------------------------- device
def test_device_refuses_over_memory_cut_naming_both_numbers():
    from splitlora.model.profile import profile_model

    prof = profile_model("llama-3.2-1b", batch_size=4, seq_len=512, granularity="sublayer")
    nano = load_devices()["Device 5"]
    d = _yaml("hardware.yaml")["devices"]["Device 5"]
    budget = float(_v(d["memory_bytes"])) - float(_v(d["memory_reserve_bytes"]))
    emu = EmulatedDevice(nano, prof.device_memory_bytes)
    too_big = [c for c in range(prof.n_cuts + 1) if prof.device_memory_bytes[c] > budget]
    fits = [c for c in range(prof.n_cuts + 1) if prof.device_memory_bytes[c] <= budget]
    assert too_big and fits
    c = too_big[0]
    with pytest.raises(DeviceMemoryError) as err:
        emu.check_cut(c)
    msg = str(err.value)
    assert f"{prof.device_memory_bytes[c]:.6g}" in msg and f"{budget:.6g}" in msg and f"cut_layer={c}" in msg
    assert isinstance(err.value, ValueError)
    emu.check_cut(fits[-1])  # no error
    with pytest.raises(ValueError, match="cut_layer"):
        emu.check_cut(prof.n_cuts + 1)


def test_device_time_is_flops_over_compute_and_real_time_holds():
    d = _yaml("hardware.yaml")
    dev = d["devices"]["Device 3"]
    P = float(_v(d["utilisation"]["device"])) * 2 * float(_v(dev["cuda_cores"])) * float(_v(dev["gpu_max_clock_hz"]))
    emu = EmulatedDevice(load_devices()["Device 3"], np.zeros(3), real_time=True, host_flops_per_s=1e11)
    assert emu.compute_time_s(3e12) == pytest.approx(3e12 / P, rel=1e-12)
    assert emu.wall_scaled_time_s(0.5) == pytest.approx(0.5 * 1e11 / P, rel=1e-12)
    t0 = time.perf_counter()
    assert emu.hold(0.04, 0.01) == pytest.approx(0.03)
    assert time.perf_counter() - t0 >= 0.029
    assert emu.hold(0.01, 0.02) == 0.0


# ------------------------------------------------------------------------------------------- server
def test_server_energy_through_emulated_backend_is_kappa_cycles_f2():
    hw = _yaml("hardware.yaml")
    s = hw["servers"][hw["default_server"]]
    eta = float(_v(_yaml("hardware.yaml")["utilisation"]["server"]))
    f_max, power = float(_v(s["gpu_max_clock_hz"])), float(_v(s["board_power_w"]))
    kappa = power / f_max ** 3
    g = 2 * float(_v(s["cuda_cores"]))
    clock = ServerClock(load_server())
    flops = 7.3e12
    f = 0.21e9 + 57 * 15e6  # a clock of the table
    with clock.turn(f) as turn:
        assert clock.backend.current_clock_mhz() == pytest.approx(f / 1e6)
        turn.run_flops(flops / 2)
        turn.run_flops(flops / 2)
    cycles = flops / (eta * g)
    assert turn.applied_hz == pytest.approx(f)
    assert turn.cycles == pytest.approx(cycles, rel=1e-12)
    assert turn.energy_j == pytest.approx(kappa * cycles * f ** 2, rel=1e-9)
    assert turn.time_s == pytest.approx(cycles / f, rel=1e-9)
    assert clock.backend.current_clock_mhz() == pytest.approx(f_max / 1e6)  # restored
    with clock.turn(0.0) as idle:
        pass
    assert idle.energy_j == 0.0 and idle.time_s == 0.0 and idle.applied_hz == 0.0
    with pytest.raises(RuntimeError):
        with clock.turn(1.0e9):
            raise RuntimeError("boom")
    assert not clock.backend.is_locked
    assert clock.backend.current_clock_mhz() == pytest.approx(f_max / 1e6)


def test_kappa_calibration_without_gpu_states_emulated_and_recovers_kappa():
    table = kappa_calibration(n_clocks=6, repeats=1, emulated_noise=0.0)
    assert table.source.str.startswith("emulated").all()
    assert table.kappa_fit.iloc[0] == pytest.approx(load_server().kappa, rel=1e-6)
    assert len(table) == 6


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def e2e():
    from splitlora.emulation.run import EMULATION_SCENARIO, emulated_training
    from splitlora.training.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    sc = replace(EMULATION_SCENARIO, devices=("Device 1", "Device 5"), steps_per_round=1, batch_size=2, seq_len=24)
    return emulated_training(("CARD", "fixed cut", "server-only"), sc, rounds=2, model=model, tokenizer=tok,
                             seed=1), model


def test_emulated_run_measured_matches_predicted_where_it_should(e2e):
    df, model = e2e
    assert len(df) == 3 * 2 * 2 and df.feasible.all()
    assert np.isfinite(df.loss).all()
    L = model.config.num_hidden_layers
    # device time from counted FLOPs equals the profile's prediction
    np.testing.assert_allclose(df.device_flops, df.device_flops_pred, rtol=1e-9)
    np.testing.assert_allclose(df.device_time_s, df.device_time_pred_s, rtol=1e-9, atol=1e-15)
    active = df.cut_layer < L
    np.testing.assert_allclose(df.applied_clock_hz[active], df.frequency_hz[active], rtol=1e-9)
    # server energy: the trainer's server work at every active cut (c = 0 included) is the profile's
    np.testing.assert_allclose(df.energy_j[active], df.energy_pred_j[active], rtol=1e-9)
    assert (df.energy_j[~active] == 0).all() and (df.energy_pred_j[~active] == 0).all()
    assert (df.cut_layer == 0).any()
    # link: smashed data + labels up, gradient down, as the model counts them
    np.testing.assert_allclose(df.link_time_s[active], df.link_time_pred_s[active], rtol=1e-9)
    # hand-over: adapter + AdamW moments (12 bytes per parameter, as modelled) + torch.save's framing
    ho = df.cut_layer > 0
    ratio = df.handover_bytes[ho] / df.handover_bytes_pred[ho]
    assert ratio.between(1.0, 1.5).all()


def test_emulated_run_delay_and_energy_equal_the_sequential_schedule(e2e):
    """Sequential mode: each turn's delay (with the model's hand-over bytes in place of torch.save's) and server
    energy equal CostModel.evaluate for the same decisions and rates to 1e-9; a round (the sum of its turns) too."""
    from splitlora.emulation.run import EMULATION_SCENARIO
    from tests.emulation.test_emulated_modes import cost_of

    df, model = e2e
    sc = replace(EMULATION_SCENARIO, devices=("Device 1", "Device 5"), steps_per_round=1, batch_size=2, seq_len=24)
    cost = cost_of(model, sc)
    P = np.array([sc.device_specs()[name].flops_per_s for name in df.device_name])
    R = df.rate_mbps.to_numpy() * 1e6
    c = df.cut_layer.to_numpy()
    T, E = cost.evaluate(c, np.where(c < cost.n_cuts, df.frequency_hz, cost.f_max_hz), P, R, R)
    modelled_handover = df.delay_s - df.handover_time_s + df.handover_time_pred_s
    np.testing.assert_allclose(modelled_handover, T, rtol=1e-9)
    np.testing.assert_allclose(df.energy_j, E, rtol=1e-9, atol=1e-18)
    rounds = df.assign(model=T, measured=modelled_handover).groupby(["policy", "round"])
    np.testing.assert_allclose(rounds.measured.sum(), rounds.model.sum(), rtol=1e-9)
    f = df.frequency_hz.to_numpy()
    wrong = np.where(f * 0.99 >= cost.f_min_hz, f * 0.99, f * 1.01)
    T_w, _ = cost.evaluate(c, np.where(c < cost.n_cuts, wrong, cost.f_max_hz), P, R, R)
    assert not np.allclose(modelled_handover, T_w, rtol=1e-6, atol=0)  # a wrong clock is seen


def test_emulated_run_same_learning_for_every_policy(e2e):
    """Split training is the same computation whatever the cut: the policies differ in cost, not in loss."""
    df, _ = e2e
    losses = df.pivot_table(index=["round", "device"], columns="policy", values="loss")
    np.testing.assert_allclose(losses.values, losses.values[:, :1].repeat(losses.shape[1], 1), rtol=1e-4)


def test_emulated_run_rejects_bad_arguments():
    from splitlora.emulation.run import emulated_training

    with pytest.raises(ValueError, match="policies"):
        emulated_training(("CARD", "best"))
    with pytest.raises(ValueError, match="devices"):
        emulated_training(scenario=Scenario(devices=("Device 9",)))
    with pytest.raises(ValueError, match="rounds"):
        emulated_training(rounds=0)
    with pytest.raises(ValueError, match="scenario.wire_bytes"):
        emulated_training(scenario=Scenario(param_bytes=4))

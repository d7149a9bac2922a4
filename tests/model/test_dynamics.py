"""Channels that change within a round: the processes, the round costs and every policy against brute force.

The brute force here uses only the CostModel's per-cut arrays and the formulas of docs/model.md written out per
mini-batch (T_d + T_l,i + T_s,i summed, hand-over at the last rate, kappa C f^2 per mini-batch), and searches every
(cut layer, clock of the supported-clock table).
"""
from dataclasses import replace

import numpy as np
import pytest
from scipy import special

from splitlora.errors import InvalidParameterError
from splitlora.model.channel import (gauss_markov_correlation, load_fading, markov_rates_bps, minibatch_rates_bps,
                                     rayleigh_rates_bps)
from splitlora.model.dynamics import DYNAMIC_POLICIES, dynamic_policies, oracle, round_costs
from splitlora.model.hardware import load_channel
from splitlora.model.scenario import Scenario

I = 4
SC = Scenario(granularity="block", steps_per_round=I)


def _setup(w=0.3):
    model = SC.cost_model()
    P, M = SC.device_arrays()
    return model, P, M, w


def brute_round(m, c, f, P, R):
    """Delay and energy of one device-round, cut c, clocks f (I,), rates R (I,)."""
    C = m.server_cycles[c]
    ts = C / np.asarray(f, dtype=float) if C > 0 else np.zeros(len(R))
    T = sum(m.device_flops[c] / P + (m.smashed_bits[c] + m.grad_bits[c]) / R[i] + ts[i] for i in range(len(R)))
    T += m.handover_bits[c] * 2 / R[-1]
    E = sum(m.kappa * C * fi ** 2 + m.static_power_w * C / fi for fi in np.asarray(f, dtype=float)) if C > 0 else 0.0
    return T, E


def brute_u(m, c, f, P, R, Mem, w):
    t_ref, e_ref = brute_round(m, 0, [m.f_max_hz] * len(R), P, R)
    T, E = brute_round(m, c, f, P, R)
    return w * T / t_ref + (1 - w) * E / e_ref


def brute_best(m, P, R, Mem, w, cuts=None):
    """Min of U over feasible cuts and the clock table (one clock per round), for rates R (I,): (U, c, f)."""
    t_ref, e_ref = brute_round(m, 0, [m.f_max_hz] * len(R), P, R)
    best = (np.inf, None, None)
    for c in (range(m.n_cuts + 1) if cuts is None else cuts):
        if m.device_memory_bytes[c] > Mem:
            continue
        f = m.clocks_hz if c < m.n_cuts else np.array([m.f_max_hz])
        T0, _ = brute_round(m, c, np.full(len(R), m.f_max_hz), P, R)        # then swap the server time per clock
        C = m.server_cycles[c]
        T = T0 - (len(R) * C / m.f_max_hz) + len(R) * C / f
        E = len(R) * (m.kappa * C * f ** 2 + m.static_power_w * C / f)
        u = w * T / t_ref + (1 - w) * E / e_ref
        j = int(np.argmin(u))
        if u[j] < best[0]:
            best = (u[j], c, f[j])
    return best


def _rates(process="Markov", tau=2, rounds=3, seed=1):
    return minibatch_rates_bps(process, rounds, I, len(SC.devices), tau, seed=seed)


def test_round_costs_equal_the_per_minibatch_sum():
    model, P, M, w = _setup()
    R = _rates("Rayleigh", tau=1)[0][0]                         # 5 device-rounds, I rates each
    rng = np.random.default_rng(0)
    c = np.array([0, 3, 7, model.n_cuts, 12])
    f = rng.choice(model.clocks_hz, size=(5, I))                                # a different clock per mini-batch
    T, E = round_costs(model, c, f, P, R)
    for k in range(5):
        t, e = brute_round(model, c[k], f[k], P[k], R[k])
        assert T[k] == pytest.approx(t, rel=1e-12) and E[k] == pytest.approx(e, rel=1e-12, abs=0)


@pytest.mark.parametrize("process", ["Markov", "Rayleigh"])
def test_oracle_equals_brute_force_over_cut_and_clock(process):
    model, P, M, w = _setup()
    R3, _ = _rates(process, tau=1)
    RK = R3.reshape(-1, I)
    PK, MK = np.tile(P, 3), np.tile(M, 3)
    d = oracle(model, PK, RK, MK, w, discrete_clocks=True)
    cont = oracle(model, PK, RK, MK, w)
    for k in range(len(PK)):
        u, c, f = brute_best(model, PK[k], RK[k], MK[k], w)
        assert d.objective[k] == pytest.approx(u, rel=1e-12) and d.cut_layer[k] == c
        assert cont.objective[k] <= u * (1 + 1e-12)                          # the continuous clock is no worse
        assert cont.objective[k] >= u * (1 - 1e-3)                           # ... and the table is fine (15 MHz)


@pytest.mark.parametrize("process", ["Markov", "Rayleigh"])
def test_each_policy_equals_its_brute_force_plan(process):
    model, P, M, w = _setup()
    rounds = 3
    R3, expected = _rates(process, tau=2, rounds=rounds)
    res = dynamic_policies(model, P, M, R3, expected, w, discrete_clocks=True)
    assert list(res) == list(DYNAMIC_POLICIES)
    Md = len(P)
    for n in range(rounds):
        for m in range(Md):
            k, R = n * Md + m, R3[n, m]
            prev = expected if n == 0 else I / np.sum(1.0 / R3[n - 1, m])
            for name, plan_rate in (("first state", R[0]), ("expected rate", expected), ("previous round", prev)):
                _, c, f = brute_best(model, P[m], np.full(I, plan_rate), M[m], w)   # CARD on one rate, by brute force
                assert res[name].objective[k] == pytest.approx(brute_u(model, c, [f] * I, P[m], R, M[m], w),
                                                               rel=1e-12), (name, k)
            _, c, _ = brute_best(model, P[m], np.full(I, R[0]), M[m], w)
            fs = [brute_best(model, P[m], np.full(I, R[i]), M[m], w, cuts=[c])[2] for i in range(I)]
            assert res["per-mini-batch clock"].objective[k] == pytest.approx(
                brute_u(model, c, fs, P[m], R, M[m], w), rel=1e-12)


@pytest.mark.parametrize("process", ["Markov", "Rayleigh"])
@pytest.mark.parametrize("tau", [1, 3, 40])
@pytest.mark.parametrize("discrete", [False, True])
def test_regret_is_never_negative(process, tau, discrete):
    model, P, M, w = _setup(w=0.1)
    R3, e = minibatch_rates_bps(process, 30, I, len(P), tau, seed=2)
    res = dynamic_policies(model, P, M, R3, e, w, discrete_clocks=discrete)
    o = res["oracle"].objective
    for name, d in res.items():
        assert np.all(d.objective >= o * (1 - 1e-12)), name
    if process == "Rayleigh" and tau == 1:  # independent fading: the paper's policy loses somewhere
        assert np.any(res["first state"].objective > o * (1 + 1e-6))


@pytest.mark.parametrize("rounds_per_step", [1, 3])
def test_coherence_of_whole_rounds_makes_first_state_policies_optimal(rounds_per_step):
    model, P, M, w = _setup(w=0.2)
    R3, e = minibatch_rates_bps("Markov", 20, I, len(P), I * rounds_per_step, seed=4)
    assert np.all(R3 == R3[:, :, :1])
    res = dynamic_policies(model, P, M, R3, e, w, discrete_clocks=True)
    o = res["oracle"]
    for name in ("first state", "per-mini-batch clock"):
        np.testing.assert_allclose(res[name].objective, o.objective, rtol=1e-12)
        np.testing.assert_array_equal(res[name].cut_layer, o.cut_layer)
    assert np.any(res["expected rate"].objective > o.objective * (1 + 1e-9))


def test_markov_blocks_and_stationary_frequencies():
    ch = load_channel()
    R = markov_rates_bps(50, 4, 3, 3, seed=0, channel=ch)                     # (N, M, I)
    flat = R.transpose(0, 2, 1).reshape(-1, 3)                                   # mini-batches in time order
    blocks = flat[: len(flat) // 3 * 3].reshape(-1, 3, 3)
    assert np.all(blocks == blocks[:, :1, :]) and np.any(np.diff(blocks[:, 0, 0]) != 0)
    many = markov_rates_bps(2000, 5, 20, 1, seed=1, channel=ch)
    freq = np.array([(many == r).mean() for r in ch.rates_bps()])
    pi = np.linalg.matrix_power(np.asarray(ch.transition), 200)[0]
    np.testing.assert_allclose(freq, pi, atol=0.01)


def test_rayleigh_correlation_floor_and_mean():
    f = load_fading()
    assert gauss_markov_correlation(1) == 0.0                                  # J0(2 pi 0.423) < 0: uncorrelated
    assert gauss_markov_correlation(10) == pytest.approx(special.j0(2 * np.pi * 0.423 / 10))
    W = load_channel().bandwidth_hz
    iid = rayleigh_rates_bps(400, 10, 50, 1, seed=0)
    assert iid.min() == pytest.approx(W * f.min_spectral_efficiency)           # the CQI-1 floor is reached
    assert iid.mean() == pytest.approx(f.expected_rate_bps(W), rel=0.01)
    x = iid.transpose(0, 2, 1).reshape(-1, 50)
    slow = rayleigh_rates_bps(400, 10, 50, 100, seed=0).transpose(0, 2, 1).reshape(-1, 50)
    lag1 = lambda a: np.mean([np.corrcoef(a[:-1, j], a[1:, j])[0, 1] for j in range(a.shape[1])])  # noqa: E731
    assert abs(lag1(x)) < 0.02 and lag1(slow) > 0.9
    assert f.doppler_hz == pytest.approx(0.833 * 3.5e9 / 299_792_458.0)


def test_bad_input_is_named():
    model, P, M, w = _setup()
    R3, e = _rates()
    with pytest.raises(InvalidParameterError, match=r"schedule='pipelined' is invalid"):
        dynamic_policies(replace(SC, schedule="pipelined").cost_model(), P, M, R3, e, w)
    with pytest.raises(InvalidParameterError, match=r"rates_bps has shape \(3, 5, 3\): must be \(rounds, devices, 4\)"):
        dynamic_policies(model, P, M, R3[:, :, :3], e, w)
    with pytest.raises(InvalidParameterError, match=r"policies=\['greedy'\] is invalid"):
        dynamic_policies(model, P, M, R3, e, w, policies=("greedy",))
    with pytest.raises(InvalidParameterError, match=r"process='AWGN' is invalid"):
        minibatch_rates_bps("AWGN", 2, I, 2, 1)
    with pytest.raises(InvalidParameterError, match=r"coherence_steps=0 is invalid"):
        minibatch_rates_bps("Markov", 2, I, 2, 0)


def test_fading_spec_is_validated():
    from splitlora.model.channel import FadingSpec
    ok = dict(mean_snr_db=15.0, carrier_hz=3.5e9, speed_m_per_s=1.0, coherence_constant=0.423,
              min_spectral_efficiency=0.15)
    FadingSpec(**ok)
    with pytest.raises(InvalidParameterError, match=r"carrier_hz=-1"):
        FadingSpec(**dict(ok, carrier_hz=-1.0))
    with pytest.raises(InvalidParameterError, match=r"mean_snr_db=nan"):
        FadingSpec(**dict(ok, mean_snr_db=float("nan")))

"""CARD against independent solvers: scipy for the frequency step, brute force for the joint problem."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.optimize import minimize_scalar

from splitlora.model.card import best_clock_hz, card, exhaustive_search, optimal_frequency_hz
from splitlora.model.system import objective
from tests.helpers import random_instance


def _u_of_f(model, c, f, P, Ru, Rd, t_ref, e_ref, w):
    T, E = model.evaluate(np.array([c]), np.array([f]), P, Ru, Rd)
    return float(objective(T, E, t_ref, e_ref, w)[0])


@pytest.mark.parametrize("static_power", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_closed_form_frequency_equals_scipy(seed, static_power):
    model, P, Ru, Rd, M, w = random_instance(seed, k=1, static_power=static_power)
    t_ref, e_ref = model.references(P, Ru, Rd)
    f_closed = optimal_frequency_hz(model, t_ref, e_ref, w)[0]
    for c in (0, model.n_cuts // 2, model.n_cuts - 1):
        res = minimize_scalar(lambda f: _u_of_f(model, c, f, P, Ru, Rd, t_ref, e_ref, w),
                              bounds=(model.f_min_hz, model.f_max_hz), method="bounded",
                              options={"xatol": 1e-3})
        u_closed = _u_of_f(model, c, f_closed, P, Ru, Rd, t_ref, e_ref, w)
        # the closed form is at least as good as scipy, and scipy's optimum agrees to 1e-6 (relative)
        assert u_closed <= res.fun * (1 + 1e-12)
        if model.f_min_hz * 1.001 < res.x < model.f_max_hz * 0.999:
            assert f_closed == pytest.approx(res.x, rel=1e-6)
        else:  # optimum at a bound: both must sit at the same bound
            assert f_closed == pytest.approx(res.x, rel=1e-3)


@pytest.mark.parametrize("seed", range(25))
def test_discrete_clock_equals_brute_force_over_table(seed):
    model, P, Ru, Rd, M, w = random_instance(seed, k=1)
    t_ref, e_ref = model.references(P, Ru, Rd)
    f_disc = optimal_frequency_hz(model, t_ref, e_ref, w, discrete_clocks=True)[0]
    assert f_disc in model.clocks_hz
    c = model.n_cuts // 2
    u_table = [_u_of_f(model, c, f, P, Ru, Rd, t_ref, e_ref, w) for f in model.clocks_hz]
    assert _u_of_f(model, c, f_disc, P, Ru, Rd, t_ref, e_ref, w) == pytest.approx(min(u_table), rel=1e-12)


@settings(max_examples=300, deadline=None, derandomize=True)  # same examples in CI as here
@given(seed=st.integers(0, 2**31 - 1), static_power=st.booleans(), schedule=st.sampled_from(["sequential", "pipelined"]))
def test_card_matches_exhaustive_joint_search(seed, static_power, schedule):
    model, P, Ru, Rd, M, w = random_instance(seed, k=4, static_power=static_power, schedule=schedule)
    # discrete_clocks: CARD over the clock table must equal brute force over (cut, table) exactly
    d = card(model, P, Ru, Rd, M, w, discrete_clocks=True)
    e = exhaustive_search(model, P, Ru, Rd, M, w)
    np.testing.assert_array_equal(d.feasible, e.feasible)
    ok = d.feasible
    np.testing.assert_allclose(d.objective[ok], e.objective[ok], rtol=1e-10)
    # continuous: CARD is never worse than a fine grid and at most the grid's resolution better
    fine = np.linspace(model.f_min_hz, model.f_max_hz, 2001)
    dc = card(model, P, Ru, Rd, M, w)
    ef = exhaustive_search(model, P, Ru, Rd, M, w, clocks_hz=fine)
    assert np.all(dc.objective[ok] <= ef.objective[ok] * (1 + 1e-10))
    assert np.all(ef.objective[ok] - dc.objective[ok] <= 1e-3 * ef.objective[ok])
    # the decisions themselves agree where the optimum is unique
    same_cut = d.cut_layer[ok] == e.cut_layer[ok]
    gap = np.abs(d.objective[ok] - e.objective[ok])
    assert np.all(same_cut | (gap <= 1e-10 * e.objective[ok]))


def test_card_respects_memory_and_reports_infeasible():
    model, P, Ru, Rd, M, w = random_instance(7, k=3)
    M = np.array([model.device_memory_bytes[0] * 0.5,          # nothing fits
                  model.device_memory_bytes[1] * 1.0001,        # c <= 1 fits
                  model.device_memory_bytes[-1] * 2])           # everything fits
    d = card(model, P, Ru, Rd, M, w)
    assert not d.feasible[0] and d.cut_layer[0] == -1 and np.isnan(d.delay_s[0])
    assert d.feasible[1] and d.cut_layer[1] in (0, 1)
    assert d.feasible[2]


def test_device_only_idles_the_server():
    model, P, Ru, Rd, M, w = random_instance(3, k=1)
    # an enormously fast device with everything fitting: device-only wins for any w < 1
    d = card(model, np.array([1e30]), Ru, Rd, np.array([1e30]), 0.5)
    assert d.cut_layer[0] == model.n_cuts
    assert d.frequency_hz[0] == 0.0 and d.energy_j[0] == 0.0


@pytest.mark.parametrize("w", [-0.1, 1.5, float("nan")])
def test_bad_weight_is_rejected(w):
    model, P, Ru, Rd, M, _ = random_instance(0, k=1)
    with pytest.raises(ValueError, match=r"w=.*must be in \[0.0, 1.0\]"):
        card(model, P, Ru, Rd, M, w)


@pytest.mark.parametrize("seed", range(30))
def test_pipelined_clock_equals_scipy(seed):
    """The piecewise closed form of the pipelined schedule against scipy on the same (kinked, convex) U(f)."""
    model, P, Ru, Rd, M, w = random_instance(seed, k=1, schedule="pipelined")
    t_ref, e_ref = model.references(P, Ru, Rd)
    for c in (0, model.n_cuts // 2, model.n_cuts - 1):
        f_closed = best_clock_hz(model, np.array([c]), P, Ru, Rd, w)[0]
        res = minimize_scalar(lambda f: _u_of_f(model, c, f, P, Ru, Rd, t_ref, e_ref, w),
                              bounds=(model.f_min_hz, model.f_max_hz), method="bounded", options={"xatol": 1e-3})
        grid = np.linspace(model.f_min_hz, model.f_max_hz, 4001)
        u_grid = min(_u_of_f(model, c, f, P, Ru, Rd, t_ref, e_ref, w) for f in grid[::40])
        u_closed = _u_of_f(model, c, f_closed, P, Ru, Rd, t_ref, e_ref, w)
        assert u_closed <= min(res.fun, u_grid) * (1 + 1e-12)
        assert u_closed == pytest.approx(res.fun, rel=1e-6)


def test_pipelining_never_slower_than_sequential():
    """Overlap can only help: for the same decisions the pipelined round is at most the sequential one."""
    for seed in range(20):
        seq, P, Ru, Rd, M, w = random_instance(seed, k=6)
        pipe, *_ = random_instance(seed, k=6, schedule="pipelined")
        c = np.arange(6) % (seq.n_cuts + 1)
        f = np.full(6, seq.f_max_hz)
        T_seq, E_seq = seq.evaluate(c, f, P, Ru, Rd)
        T_pipe, E_pipe = pipe.evaluate(c, f, P, Ru, Rd)
        assert np.all(T_pipe <= T_seq * (1 + 1e-12)) and np.array_equal(E_seq, E_pipe)

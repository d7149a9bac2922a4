"""Parallel schedules: CARD (cuts + clock shares) against brute force and scipy, and the round cost itself."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import minimize

from splitlora.errors import InvalidParameterError
from splitlora.model.card import card
from splitlora.model.hardware import ServerSpec
from splitlora.model.parallel import allocate, card_parallel, card_rounds, exhaustive_parallel, exhaustive_rounds
from splitlora.model.system import CostModel, Workload
from tests.helpers import synthetic_profile

SCHEDULES = ("parallel", "parallel-pipelined")


def parallel_instance(seed: int, rounds: int = 3, devices: int = 3, n_cuts: int = 3, levels: int = 10,
                      schedule: str = "parallel"):
    """(CostModel, P, R_up, R_down, M, w) with (rounds, devices) inputs; the clock table has ``levels`` steps."""
    rng = np.random.default_rng(seed)
    prof = synthetic_profile(rng, n_cuts=n_cuts)
    f_max = rng.uniform(1e9, 3e9)
    server = ServerSpec.from_datasheet(board="test", cuda_cores=int(rng.integers(1000, 10000)),
                                       utilisation=rng.uniform(0.1, 1), f_min_hz=f_max / levels, f_max_hz=f_max,
                                       clock_step_hz=f_max / levels, board_power_w=rng.uniform(50, 500))
    model = CostModel.from_profile(prof, server, Workload(steps_per_round=int(rng.integers(1, 20)), schedule=schedule))
    shape = (rounds, devices)
    P = rng.uniform(5e10, 5e12, size=shape)
    Ru, Rd = rng.uniform(1e6, 2e8, size=shape), rng.uniform(1e6, 2e8, size=shape)
    M = rng.uniform(0.5, 1.2, size=shape) * prof.device_memory_bytes[-1]
    return model, P, Ru, Rd, M, float(rng.uniform(0.02, 1))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seed", range(12))
def test_card_parallel_equals_brute_force(seed, schedule):
    model, P, Ru, Rd, M, w = parallel_instance(seed, rounds=2, schedule=schedule)
    # discrete shares (multiples of the table step): CARD equals the joint brute force over cuts x shares
    d = card_parallel(model, P, Ru, Rd, M, w, discrete_clocks=True)
    e = exhaustive_parallel(model, P, Ru, Rd, M, w)
    np.testing.assert_array_equal(d.feasible, e.feasible)
    ok = d.feasible[:, 0]
    np.testing.assert_allclose(d.objective[ok], e.objective[ok], rtol=1e-9)
    assert np.all(d.frequency_hz[ok].sum(1) <= model.f_max_hz * (1 + 1e-9))
    # continuous shares: never worse than a share grid; equal to every cut combination with its exact allocation
    dc = card_parallel(model, P, Ru, Rd, M, w)
    ef = exhaustive_parallel(model, P, Ru, Rd, M, w, shares_hz=np.linspace(model.f_max_hz / 20, model.f_max_hz, 20))
    assert np.all(dc.objective[ok] <= ef.objective[ok] * (1 + 1e-9))
    assert np.all(dc.objective[ok] <= d.objective[ok] * (1 + 1e-9))        # discrete is a restriction
    t_d, t_l, t_h = (a.reshape(P.shape + (-1,)) for a in model.stage_times_s(P.ravel(), Ru.ravel(), Rd.ravel()))
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    best = np.full(P.shape[0], np.inf)
    for combo in itertools.product(range(model.n_cuts + 1), repeat=P.shape[1]):
        c = np.broadcast_to(np.array(combo), P.shape)
        fits = np.all(model.device_memory_bytes[c] <= M, axis=1)
        pick = lambda a: np.take_along_axis(a, c[..., None], -1)[..., 0]  # noqa: E731
        _, U = allocate(model, c, pick(t_d), pick(t_l), pick(t_h), t_ref, e_ref, w)
        best = np.minimum(best, np.where(fits, U, np.inf))
    np.testing.assert_allclose(dc.objective[ok][:, 0], best[ok], rtol=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seed", range(10))
def test_allocation_equals_scipy(seed, schedule):
    """For fixed cuts the KKT/Newton shares against scipy's SLSQP on the epigraph form (tau, f_1..f_M)."""
    model, P, Ru, Rd, M, w = parallel_instance(seed, rounds=1, devices=4, n_cuts=6, schedule=schedule)
    rng = np.random.default_rng(seed)
    c = rng.integers(0, model.n_cuts, size=(1, 4))                           # all active
    t_d, t_l, t_h = (a[np.arange(4), c[0]][None] for a in model.stage_times_s(P[0], Ru[0], Rd[0]))
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    f, U = allocate(model, c, t_d, t_l, t_h, t_ref, e_ref, w)
    F = model.f_max_hz

    def u(x):  # x = (tau / T_ref, f / F)
        E = model.server_energy_j(c[0], x[1:] * F).sum()
        return w * x[0] + (1 - w) * E / e_ref[0]

    I = model.iterations

    def slack(x):  # tau >= each device's finish time, the max of the pipelined schedule as separate smooth lines
        t_s = model.server_cycles[c[0]] / (x[1:] * F)
        once = t_d[0] + t_l[0] + t_s + t_h[0]
        if schedule == "parallel":
            return x[0] - (I * (t_d[0] + t_l[0] + t_s) + t_h[0]) / t_ref[0]
        return np.concatenate([x[0] - ((I - 1) * X + once) / t_ref[0] for X in (t_d[0], t_l[0], t_s)])

    x0 = np.r_[2.0 / w, np.full(4, 0.2)]
    res = minimize(u, x0, method="SLSQP", bounds=[(0, None)] + [(1e-4, 1)] * 4,
                   constraints=[{"type": "ineq", "fun": slack}, {"type": "ineq", "fun": lambda x: 1 - x[1:].sum()}],
                   options={"ftol": 1e-12, "maxiter": 1000})
    assert res.success
    T_round, E_round, _, _ = model.parallel_round(c, f, P, Ru, Rd)
    assert U[0] == pytest.approx(w * T_round[0] / t_ref[0] + (1 - w) * E_round[0] / e_ref[0], rel=1e-12)
    assert U[0] <= res.fun * (1 + 1e-7)
    assert U[0] == pytest.approx(res.fun, rel=1e-5)


def test_parallel_round_is_max_delay_and_summed_energy():
    model, P, Ru, Rd, M, w = parallel_instance(1, rounds=2, devices=3, schedule="parallel")
    seq = CostModel(**{**model.__dict__, "schedule": "sequential"})
    c = np.array([[0, 1, model.n_cuts], [2, 2, 0]])
    f = np.array([[0.3, 0.5, 0.0], [0.2, 0.2, 0.4]]) * model.f_max_hz
    T, E, Tm, Em = model.parallel_round(c, f, P, Ru, Rd)
    # each device alone is the sequential device-round with its share as the clock
    for n in range(2):
        for m in range(3):
            if c[n, m] < model.n_cuts and f[n, m] >= seq.f_min_hz:
                t1, e1 = seq.evaluate(c[n, m:m + 1], f[n, m:m + 1], P[n, m:m + 1], Ru[n, m:m + 1], Rd[n, m:m + 1])
                assert Tm[n, m] == pytest.approx(t1[0], rel=1e-12) and Em[n, m] == pytest.approx(e1[0], rel=1e-12)
    np.testing.assert_allclose(T, Tm.max(1), rtol=0)
    np.testing.assert_allclose(E, Em.sum(1), rtol=0)
    assert Em[0, 2] == 0.0
    with pytest.raises(InvalidParameterError, match="sum of the clock shares"):
        model.parallel_round(c, np.full((2, 3), 0.5 * model.f_max_hz), P, Ru, Rd)


def test_parallel_inputs_are_checked():
    model, P, Ru, Rd, M, w = parallel_instance(2, schedule="parallel")
    with pytest.raises(InvalidParameterError, match="schedule='parallel' is invalid here"):
        card(model, P[0], Ru[0], Rd[0], M[0], w)
    with pytest.raises(InvalidParameterError, match=r"w=0.0 is invalid for the parallel schedules"):
        card_parallel(model, P, Ru, Rd, M, 0.0)
    with pytest.raises(InvalidParameterError, match=r"must be \(rounds, devices\)"):
        card_parallel(model, P[0], Ru[0], Rd[0], M[0], w)
    hot = CostModel(**{**model.__dict__, "static_power_w": 5.0})
    with pytest.raises(InvalidParameterError, match="static_power_w=5.0"):
        card_parallel(hot, P, Ru, Rd, M, w)


def test_card_rounds_dispatches_every_schedule():
    for schedule in ("sequential", "pipelined"):
        model, P, Ru, Rd, M, w = parallel_instance(4, schedule=schedule)
        d = card_rounds(model, P, Ru, Rd, M, w, discrete_clocks=True)
        flat = card(model, P.ravel(), Ru.ravel(), Rd.ravel(), M.ravel(), w, discrete_clocks=True)
        np.testing.assert_array_equal(d.cut_layer.ravel(), flat.cut_layer)
        e = exhaustive_rounds(model, P, Ru, Rd, M, w)
        ok = d.feasible
        np.testing.assert_allclose(d.objective[ok], e.objective[ok], rtol=1e-10)


def test_memory_limits_the_cuts_and_infeasible_rounds_are_reported():
    model, P, Ru, Rd, M, w = parallel_instance(5, schedule="parallel-pipelined")
    M = M.copy()
    M[0, 1] = model.device_memory_bytes[0] * 0.5                            # device 2 of round 1 fits nothing
    M[1, :] = model.device_memory_bytes[1] * 1.0001                         # round 2: cuts 0 and 1 only
    d = card_parallel(model, P, Ru, Rd, M, w)
    assert not d.feasible[0].any() and np.all(d.cut_layer[0] == -1) and np.isnan(d.objective[0]).all()
    assert d.feasible[1].all() and np.all(d.cut_layer[1] <= 1)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seed", range(6))
def test_descent_bound_never_prunes_a_better_cut(seed, schedule):
    """The lower bound that lets parallel CARD skip coordinate-descent trials: every trial cut that beats a random
    incumbent (solved here by :func:`allocate`) has a bound below the incumbent's U, and then at most its own U."""
    from splitlora.model.parallel import _fastest_s, _lower_bound, _pace, _stages

    model, P, Ru, Rd, M, w = parallel_instance(seed, rounds=40, devices=4, n_cuts=6, schedule=schedule)
    N, Md = P.shape
    L = model.n_cuts
    t_d, t_l, t_h = _stages(model, P, Ru, Rd)
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    fits = model.device_memory_bytes[None, None, :] <= M[..., None]
    rng = np.random.default_rng(seed)
    keep = fits.any(-1).all(-1)
    c = np.array([[rng.choice(np.flatnonzero(fits[n, m])) if fits[n, m].any() else 0 for m in range(Md)]
                  for n in range(N)])[keep]
    t_d, t_l, t_h, fits, t_ref, e_ref = t_d[keep], t_l[keep], t_h[keep], fits[keep], t_ref[keep], e_ref[keep]
    N = len(c)
    pick = lambda a, cc, rows: a[rows[:, None], np.arange(Md), cc]  # noqa: E731
    f, U = allocate(model, c, *(pick(a, c, np.arange(N)) for a in (t_d, t_l, t_h)), t_ref, e_ref, w)
    pace = _pace(model, t_d, t_l, t_h)
    fast = _fastest_s(model, pace, np.broadcast_to(model.server_cycles, t_d.shape), fits)
    better_seen = 0
    for m in range(Md):
        bound = _lower_bound(model, pace, fast, c, f, U, m, t_d, t_l, t_h, t_ref, e_ref, w)
        trial = np.repeat(c[:, None], L + 1, 1)
        trial[:, :, m] = np.arange(L + 1)
        trial = trial.reshape(-1, Md)
        rows = np.repeat(np.arange(N), L + 1)
        ok = fits[rows[:, None], np.arange(Md), trial].all(-1)
        Ut = np.full(len(rows), np.inf)
        Ut[ok] = allocate(model, trial[ok], *(pick(a, trial[ok], rows[ok]) for a in (t_d, t_l, t_h)),
                          t_ref[rows[ok]], e_ref[rows[ok]], w)[1]
        Ut = Ut.reshape(N, L + 1)
        better = Ut < U[:, None] * (1 - 1e-12)
        better_seen += int(better.sum())
        assert np.all(bound[better] < (U[:, None] * (1 - 1e-12 + 1e-9) * np.ones_like(Ut))[better])
        assert np.all(bound[better] <= Ut[better] * (1 + 1e-9))
    assert better_seen > 0  # the check had something to check


def test_rounds_are_solved_alone(monkeypatch):
    """card_parallel solves rounds in pieces of _CHUNK: pieces of 2 give the decisions of one piece."""
    import splitlora.model.parallel as par
    model, P, Ru, Rd, M, w = parallel_instance(4, rounds=7, devices=3, n_cuts=5, schedule="parallel-pipelined")
    whole = card_parallel(model, P, Ru, Rd, M, w)
    monkeypatch.setattr(par, "_CHUNK", 2)
    pieces = card_parallel(model, P, Ru, Rd, M, w)
    for k in ("cut_layer", "frequency_hz", "objective", "feasible"):
        np.testing.assert_array_equal(getattr(pieces, k), getattr(whole, k))
    assert len(np.unique(whole.cut_layer)) > 1


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seed", range(4))
def test_sweep_least_energy_cut_by_brute_force(seed, schedule):
    """The deadline sweep's least-energy cut, share and energy per device and deadline, against every cut's smallest
    sufficient share found by bisection on CostModel.round_delay_s (continuous; no helper of CARD used)."""
    from splitlora.model.parallel import _least_energy_cuts, _pace, _stages
    model, P, Ru, Rd, M, w = parallel_instance(seed, rounds=3, devices=4, n_cuts=6, schedule=schedule)
    t_d, t_l, t_h = _stages(model, P, Ru, Rd)                                           # (N, M, L+1)
    fits = model.device_memory_bytes[None, None, :] <= M[..., None]
    F, C = model.f_max_hz, model.server_cycles
    fastest = model.round_delay_s(t_d, t_l, t_h, np.where(C > 0, C / F, 0.0))
    taus = np.geomspace(fastest.min(), fastest.max() * 3, 40)[None, :].repeat(3, 0)     # (N, G)
    cut, need, energy = _least_energy_cuts(model, _pace(model, t_d, t_l, t_h), fits, taus)
    lo, hi = np.full(t_d.shape + (40,), 1.0), np.full(t_d.shape + (40,), F)            # (N, M, L+1, G) shares
    x = lambda a: a[..., None]  # noqa: E731
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        ok = model.round_delay_s(x(t_d), x(t_l), x(t_h), x(C)[None, None] / mid) <= taus[:, None, None, :]
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    can = x(fits) & (model.round_delay_s(x(t_d), x(t_l), x(t_h), x(C)[None, None] / F) <= taus[:, None, None, :])
    f = np.where(x(C)[None, None] > 0, hi, 0.0)
    E = np.where(can, model.energy_j(model.iterations * x(C)[None, None], f), np.inf)   # (N, M, L+1, G)
    best = E.min(2).transpose(0, 2, 1)                                                   # (N, G, M)
    assert np.isfinite(best).any() and (~np.isfinite(best)).any() and (best == 0).any() and (best > 0).any()
    np.testing.assert_allclose(energy, best, rtol=1e-9)
    share = np.take_along_axis(f, np.transpose(cut, (0, 2, 1))[:, :, None, :], 2)[:, :, 0].transpose(0, 2, 1)
    np.testing.assert_allclose(np.where(np.isfinite(best), need, 0), np.where(np.isfinite(best), share, 0), rtol=1e-9)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_allocation_of_many_devices_against_a_deadline_grid(schedule):
    """40 devices (many line crossings): the allocation's U is no worse than any deadline of a dense grid whose
    shares are found by bisection on CostModel.round_delay_s, and within 1e-4 of the grid's best."""
    model, P, Ru, Rd, M, w = parallel_instance(5, rounds=3, devices=40, n_cuts=6, schedule=schedule)
    rng = np.random.default_rng(5)
    c = rng.integers(0, model.n_cuts, size=(3, 40))
    t_d, t_l, t_h = (np.take_along_axis(a.reshape(3, 40, -1), c[..., None], -1)[..., 0]
                     for a in model.stage_times_s(P.reshape(-1), Ru.reshape(-1), Rd.reshape(-1)))
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    f, U = allocate(model, c, t_d, t_l, t_h, t_ref, e_ref, w)
    F, C = model.f_max_hz, model.server_cycles[c]
    fastest = model.round_delay_s(t_d, t_l, t_h, C / F).max(1)
    taus = fastest[:, None] * np.geomspace(1, 50, 4000)[None, :]                        # (N, G)
    x = lambda a: a[..., None]  # noqa: E731
    lo, hi = np.zeros(C.shape + (4000,)), np.full(C.shape + (4000,), F)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        fast_enough = model.round_delay_s(x(t_d), x(t_l), x(t_h), x(C) / mid) <= taus[:, None, :]
        hi, lo = np.where(fast_enough, mid, hi), np.where(fast_enough, lo, mid)
    E = model.energy_j(model.iterations * x(C), hi).sum(1)
    Ug = np.where(hi.sum(1) <= F, w * taus / x(t_ref) + (1 - w) * E / x(e_ref), np.inf)
    assert np.isfinite(Ug).any(1).all()
    assert np.all(U <= Ug.min(1) * (1 + 1e-9))
    assert np.all(U >= Ug.min(1) * (1 - 1e-4))
    assert np.all(f.sum(1) <= F * (1 + 1e-12))

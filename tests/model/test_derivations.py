"""D1, D2, D3 of docs/model.md checked numerically (sequential schedule)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import ConvexHull, QhullError

from splitlora.model.card import card
from splitlora.model.hardware import ServerSpec
from splitlora.model.scenario import Scenario
from splitlora.model.system import CostModel, Workload
from tests.helpers import random_instance, synthetic_profile


def _hull_vertices(points: np.ndarray) -> set[int]:
    """Indices of the vertices of the convex hull of 2-D points (all points if fewer than 3 or collinear ends)."""
    if len(points) <= 2:
        return set(range(len(points)))
    scaled = (points - points.min(0)) / np.where(np.ptp(points, 0) > 0, np.ptp(points, 0), 1.0)
    try:
        return set(ConvexHull(scaled).vertices.tolist())
    except QhullError:  # collinear: the two extreme points
        order = np.lexsort(scaled.T[::-1])
        return {int(order[0]), int(order[-1])}


def _instance(seed: int, uniform: bool):
    model, P, Ru, Rd, M, w = random_instance(seed, k=6)
    if uniform:  # equal units: F_d and A affine in c on 0..L-1 (the head at c = L)
        rng = np.random.default_rng(seed)
        prof = synthetic_profile(rng, n_cuts=model.n_cuts)
        L = prof.n_cuts
        unit, head = rng.uniform(1e10, 1e12), rng.uniform(1e10, 1e12)
        dev = np.r_[np.arange(L) * unit, L * unit + head]
        prof.device_fwd_flops, prof.device_bwd_flops = dev, 1.5 * dev
        prof.server_fwd_flops, prof.server_bwd_flops = dev[-1] - dev, 1.5 * (dev[-1] - dev)
        server = ServerSpec(board="t", cuda_cores=4000, utilisation=0.4, f_min_hz=2e8, f_max_hz=2.5e9,
                            clock_step_hz=15e6, board_power_w=165.0)
        model = CostModel.from_profile(prof, server, Workload(steps_per_round=model.iterations))
    return model, P, Ru, Rd, M, w


@pytest.mark.parametrize("uniform", [False, True])
def test_d1_sequential_optimum_is_an_end_the_memory_limit_or_a_hull_vertex(uniform):
    """D1: for a fixed clock U is affine in (F_d(c), A(c)) on 1..L-1, so min over clocks is concave there and the best
    cut is 0, L, the memory limit or a vertex of the hull of the points (F_d(c), A(c)); with equal units the points
    are collinear and the vertices are the first and last interior cut."""
    interior_vertex_optima = 0
    for seed in range(150):
        model, P, Ru, Rd, M, w = _instance(seed, uniform)
        L = model.n_cuts
        for discrete in (False, True):
            d = card(model, P, Ru, Rd, M, w, discrete_clocks=discrete)
            for k in np.flatnonzero(d.feasible):
                c_mem = int(np.flatnonzero(model.device_memory_bytes <= M[k]).max())
                hi = min(c_mem, L - 1)
                pts = np.c_[model.device_flops, model.handover_bits][1:hi + 1]
                allowed = {0, L, c_mem} | {1 + v for v in _hull_vertices(pts)}
                c = int(d.cut_layer[k])
                assert c in allowed, (seed, discrete, c, sorted(allowed))
                interior_vertex_optima += c not in (0, 1, L, c_mem, hi)
    if uniform:
        assert interior_vertex_optima == 0
    else:  # non-uniform units do give interior optima (at hull vertices): the statement is not vacuous
        assert interior_vertex_optima > 0


def test_d2_clock_does_not_depend_on_the_cut_or_on_kappa():
    """D2: f* = (w E_ref / (2 (1 - w) kappa T_ref))^(1/3) is the same for every active cut, and kappa cancels."""
    sc = Scenario(discrete_clocks=False, w=0.3)
    model = sc.cost_model()
    P, M = sc.device_arrays()
    R = np.full(len(P), 1e8)
    hot = CostModel(**{**model.__dict__, "kappa": model.kappa * 37.0})
    a, b = card(model, P, R, R, M, sc.w), card(hot, P, R, R, M, sc.w)
    np.testing.assert_array_equal(a.cut_layer, b.cut_layer)
    np.testing.assert_allclose(a.frequency_hz, b.frequency_hz, rtol=1e-12)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-12)
    t_ref, e_ref = model.references(P, R, R)
    f_star = np.cbrt(sc.w * e_ref / (2 * (1 - sc.w) * model.kappa * t_ref))
    active = a.cut_layer < model.n_cuts
    np.testing.assert_allclose(a.frequency_hz[active], np.clip(f_star, model.f_min_hz, model.f_max_hz)[active],
                               rtol=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_d3_energy_saved_against_the_same_cut_at_f_max(seed):
    """D3: with P0 = 0, the energy saved by clock f against the same cut at f_max is 1 - (f / f_max)^2."""
    model, P, Ru, Rd, M, w = random_instance(seed, k=5)
    c = np.arange(5) % model.n_cuts
    f = np.linspace(model.f_min_hz, model.f_max_hz, 5)
    _, E = model.evaluate(c, f, P, Ru, Rd)
    _, E_max = model.evaluate(c, np.full(5, model.f_max_hz), P, Ru, Rd)
    np.testing.assert_allclose(1 - E / E_max, 1 - (f / model.f_max_hz) ** 2, rtol=1e-12, atol=1e-15)
    assert np.sqrt(1 - 0.531) == pytest.approx(0.685, abs=1e-3)   # 53.1% saved means f* = 0.685 f_max

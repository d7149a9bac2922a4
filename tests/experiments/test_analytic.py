"""Numbers the figures show, recomputed independently: plain loops over the documented formulas
(docs/model.md) on the raw profile arrays and YAML numbers, not through CostModel or CARD."""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from splitlora.experiments import analytic as ex
from splitlora.model.scenario import DEVICE_NAMES, Scenario
from splitlora.paths import DATA_DIR

HW = yaml.safe_load((DATA_DIR / "hardware.yaml").read_text())
CH = yaml.safe_load((DATA_DIR / "channel.yaml").read_text())


def _v(x):
    return x["value"]


def _rate(state):
    return _v(CH["bandwidth_hz"]) * math.log2(1 + 10 ** (_v(CH["snr_db"][state]) / 10))


def _device(name):
    d = HW["devices"][name]
    eta = _v(HW["utilisation"]["device"])
    return eta * 2 * _v(d["cuda_cores"]) * _v(d["gpu_max_clock_hz"]), _v(d["memory_bytes"]) - _v(d["memory_reserve_bytes"])


SRV = HW["servers"][HW["default_server"]]
KAPPA = _v(SRV["board_power_w"]) / _v(SRV["gpu_max_clock_hz"]) ** 3
FMIN, FMAX, STEP = _v(SRV["gpu_min_clock_hz"]), _v(SRV["gpu_max_clock_hz"]), _v(SRV["gpu_clock_step_hz"])
CLOCKS = list(np.arange(FMIN, FMAX + 1, STEP)) + ([FMAX] if (FMAX - FMIN) % STEP else [])
ETA_G = _v(HW["utilisation"]["server"]) * 2 * _v(SRV["cuda_cores"])


def _round(p, c, f, P, R, I=10):
    """(T, E) of one device-round by the formulas of docs/model.md, scalar arithmetic."""
    Fd = p.device_fwd_flops[c] + p.device_bwd_flops[c]
    Cs = (p.server_fwd_flops[c] + p.server_bwd_flops[c]) / ETA_G
    labels = p.batch_size * p.seq_len * 8 if c < p.n_cuts else 0  # int64 labels go up with the smashed data
    T = I * (Fd / P + 8 * (p.smashed_bytes[c] + labels) / R + 8 * p.grad_bytes[c] / R + (Cs / f if Cs else 0.0))
    T += 2 * 8 * p.device_lora_params[c] * 12 / R  # adapter weights + two AdamW moments, fp32
    return T, I * KAPPA * Cs * f ** 2


def _brute_force(p, P, M, R, w):
    T_ref, E_ref = _round(p, 0, FMAX, P, R)
    best = (math.inf, None, None)
    for c in range(p.n_cuts + 1):
        if p.device_memory_bytes[c] > M:
            continue
        for f in (CLOCKS if c < p.n_cuts else [FMAX]):
            T, E = _round(p, c, f, P, R)
            u = w * T / T_ref + (1 - w) * E / E_ref
            if u < best[0] - 1e-12:
                best = (u, c, f if c < p.n_cuts else 0.0)
    return best


@pytest.mark.parametrize("state", ["Good", "Poor"])
def test_fig2_decisions_equal_brute_force(state):
    sc = Scenario()
    weights = (0.05, 0.1, 0.3)
    table = ex.optimal_decisions(sc, state, weights=weights)
    p = sc.profile()
    for _, row in table.iterrows():
        P, M = _device(row.device)
        u, c, f = _brute_force(p, P, M, _rate(state), row.w)
        assert row.cut_layer == c, (row.device, row.w)
        assert row.frequency_ghz == pytest.approx(f / 1e9, abs=1e-12)
        assert row.objective == pytest.approx(u, rel=1e-9)


def test_fig3_server_only_and_fixed_cut_by_hand():
    sc = Scenario()
    table = ex.policy_comparison(sc, rounds=3, conditions=("Normal",)).set_index("policy")
    p = sc.profile()
    R = _rate("Normal")
    so = [_round(p, 0, FMAX, *(_device(d)[0], R)) for d in sc.devices]
    assert table.loc["server-only", "mean_delay_s"] == pytest.approx(np.mean([t for t, _ in so]), rel=1e-9)
    assert table.loc["server-only", "mean_energy_j"] == pytest.approx(np.mean([e for _, e in so]), rel=1e-9)
    L = p.n_cuts
    fits = [d for d in sc.devices if p.device_memory_bytes[L // 2] <= _device(d)[1]]
    fc = [_round(p, L // 2, FMAX, _device(d)[0], R) for d in fits]
    assert table.loc["fixed cut", "feasible_fraction"] == pytest.approx(len(fits) / len(sc.devices))
    assert table.loc["fixed cut", "mean_delay_s"] == pytest.approx(np.mean([t for t, _ in fc]), rel=1e-9)
    # CARD's reduction against server-only, from brute-force decisions
    card_T = card_E = 0.0
    for d in sc.devices:
        P, M = _device(d)
        _, c, f = _brute_force(p, P, M, R, sc.w)
        T, E = _round(p, c, f if c < L else FMAX, P, R)
        card_T, card_E = card_T + T, card_E + E
    red_T = 1 - card_T / sum(t for t, _ in so)
    assert table.loc["server-only", "delay_reduction"] == pytest.approx(red_T, rel=1e-9)
    assert table.loc["server-only", "energy_reduction"] == pytest.approx(1 - card_E / sum(e for _, e in so), rel=1e-9)


def test_fig1_profile_table_is_consistent():
    table = ex.profile_table()
    for g, L in (("block", 16), ("sublayer", 32)):
        sub = table[table.granularity == g]
        assert sub.cut_layer.tolist() == list(range(L + 1))
        total = sub.device_tflop + sub.server_tflop
        assert np.allclose(total, total.iloc[0], rtol=1e-12)
        assert sub.device_tflop.is_monotonic_increasing and sub.device_memory_gb.is_monotonic_increasing
        for name in DEVICE_NAMES:
            M = _device(name)[1]
            assert (sub[f"fits_{name}"] == (sub.device_memory_gb * 1e9 <= M)).all()


def test_fig4_curves_convex_with_optimum_at_minimum():
    curves = ex.objective_curves(n_points=400)
    for c, g in curves.groupby("cut_layer"):
        u = g.objective.to_numpy()
        assert np.all(np.diff(u, 2) > 0), c
        grid_best = g.frequency_ghz.to_numpy()[np.argmin(u)]
        spacing = np.diff(g.frequency_ghz.to_numpy())[0]
        assert abs(grid_best - g.optimum_ghz.iloc[0]) <= spacing


def test_energy_only_weight_pushes_every_device_to_its_memory_limit():
    sc = Scenario(w=0.0)
    table = ex.optimal_decisions(sc, "Normal", weights=(0.0,))
    p = sc.profile()
    for _, row in table.iterrows():
        M = _device(row.device)[1]
        assert row.cut_layer == max(c for c in range(p.n_cuts + 1) if p.device_memory_bytes[c] <= M)


def test_fig6_pipelined_decisions_equal_brute_force():
    """fig6's pipelined rows against a scalar brute force over (cut, clock table) with the pipelined delay."""
    sc = Scenario(schedule="pipelined")
    table = ex.schedule_comparison(sc, "Normal")
    p = sc.profile()
    I, R = 10, _rate("Normal")

    def rnd(c, f, P):
        Fd = p.device_fwd_flops[c] + p.device_bwd_flops[c]
        Cs = (p.server_fwd_flops[c] + p.server_bwd_flops[c]) / ETA_G
        labels = p.batch_size * p.seq_len * 8 if c < p.n_cuts else 0
        td, tl = Fd / P, (8 * (p.smashed_bytes[c] + labels) + 8 * p.grad_bytes[c]) / R
        ts = Cs / f if Cs else 0.0
        T = (I - 1) * max(td, tl, ts) + td + tl + ts + 2 * 8 * p.device_lora_params[c] * 12 / R
        return T, I * KAPPA * Cs * f ** 2

    for _, row in table[table.schedule == "pipelined"].iterrows():
        P, M = _device(row.device)
        T_ref, E_ref = rnd(0, FMAX, P)
        best = min((sc.w * T / T_ref + (1 - sc.w) * E / E_ref, c, f if c < p.n_cuts else 0.0)
                   for c in range(p.n_cuts + 1) if p.device_memory_bytes[c] <= M
                   for f in (CLOCKS if c < p.n_cuts else [FMAX]) for T, E in [rnd(c, f, P)])
        assert (row.cut_layer, row.frequency_ghz) == (best[1], pytest.approx(best[2] / 1e9, abs=1e-12))
        assert row.objective == pytest.approx(best[0], rel=1e-9)
    pipe = table[table.schedule == "pipelined"]
    assert pipe.cut_layer.is_monotonic_decreasing and 0 < pipe.cut_layer.iloc[0] < 32

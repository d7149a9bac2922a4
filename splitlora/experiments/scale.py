"""Beyond the paper's scale: CARD for larger models (Llama-3.1-8B/70B, Qwen2.5-7B) and fleets of up to 1,000 devices.

The ``scale`` notebook only calls these and plots (docs/model.md "Fleets"). Decisions are deterministic for a given
seed; :func:`card_runtime` measures wall-clock time and is kept apart from the decision tables.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd

from splitlora import _validate as V
from splitlora.experiments.analytic import _rounds
from splitlora.model.card import card
from splitlora.model.fleet import draw_fleet
from splitlora.model.hardware import load_channel
from splitlora.model.scenario import Scenario, channel_states

MODELS = ("llama-3.2-1b", "qwen2.5-7b", "llama-3.1-8b", "llama-3.1-70b")
FLEET_SIZES = (10, 100, 1000)


def _check_schedule(scenario: Scenario) -> None:
    V.check_choice("schedule", scenario.schedule, ("sequential", "pipelined"))  # CARD per device-round at this scale


def _fleet_decisions(scenario: Scenario, model: str, num_devices: int, rounds: int, seed: int):
    """(scenario of the fleet, its CostModel, CARD inputs (K,) each, Decision) under Markov channels."""
    _check_schedule(scenario)
    V.check_int_range("rounds", rounds, 1, 10**6)
    sc = replace(scenario, model=model, devices=draw_fleet(num_devices, seed, scenario.devices, scenario.hardware))
    cm = sc.cost_model()
    args = _rounds(sc, channel_states("Markov", rounds, num_devices, seed))
    return sc, cm, args, card(cm, *args, sc.w, discrete_clocks=sc.discrete_clocks)


def scale_table(scenario: Scenario | None = None, models=MODELS, fleet_sizes=FLEET_SIZES, rounds: int = 100,
                seed: int = 0) -> pd.DataFrame:
    """CARD's decisions per model and fleet size (fleets from :func:`draw_fleet`, Markov channels, ``rounds``).

    Columns: model, n_cuts, num_devices, device_rounds, mean_cut_fraction (mean c / L over feasible device-rounds),
    server_only_fraction (c = 0), device_only_fraction (c = L), interior_fraction, infeasible_fraction,
    mean_frequency_ghz (over device-rounds with c < L), mean_delay_s and mean_energy_j (per device-round),
    round_delay_s and round_energy_j (summed over the fleet, devices served one after another; mean over rounds).
    """
    scenario = Scenario() if scenario is None else scenario
    rows = []
    for m in models:
        for n in fleet_sizes:
            _, cm, _, d = _fleet_decisions(scenario, m, int(n), rounds, seed)
            L, ok = cm.n_cuts, d.feasible
            c = d.cut_layer[ok]
            active = ok & (d.cut_layer < L)
            rows.append({"model": m, "n_cuts": L, "num_devices": int(n), "device_rounds": int(d.cut_layer.size),
                         "mean_cut_fraction": float(c.mean() / L) if c.size else np.nan,
                         "server_only_fraction": float(np.mean(d.cut_layer == 0)),
                         "device_only_fraction": float(np.mean(d.cut_layer == L)),
                         "interior_fraction": float(np.mean(ok & (d.cut_layer > 0) & (d.cut_layer < L))),
                         "infeasible_fraction": float(np.mean(~ok)),
                         "mean_frequency_ghz": float(d.frequency_hz[active].mean() / 1e9) if active.any() else np.nan,
                         "mean_delay_s": float(np.nanmean(d.delay_s)), "mean_energy_j": float(np.nanmean(d.energy_j)),
                         "round_delay_s": float(np.nansum(d.delay_s) / rounds),
                         "round_energy_j": float(np.nansum(d.energy_j) / rounds)})
    return pd.DataFrame(rows)


def memory_table(scenario: Scenario | None = None, models=MODELS, channel_state: str = "Normal") -> pd.DataFrame:
    """Which device profiles can hold any cut of each model, and CARD's cut for each under one channel state.

    Columns: model, n_cuts, device, board, training_memory_gb, memory_cut0_gb (embedding only), memory_device_only_gb
    (c = L), max_feasible_cut (-1: none fits), holds_any_cut, card_cut (-1: infeasible), card_frequency_ghz,
    server_weights_cut0_gb (frozen weights the server holds at c = 0; the cost model does not check server memory).
    """
    scenario = Scenario() if scenario is None else scenario
    _check_schedule(scenario)
    specs = scenario.device_specs()
    names = tuple(specs)
    rows = []
    for m in models:
        sc = replace(scenario, model=m, devices=names)
        cm = sc.cost_model()
        P, M = sc.device_arrays()
        R = np.full(len(P), load_channel().rate_bps(channel_state))
        d = card(cm, P, R, R, M, sc.w, discrete_clocks=sc.discrete_clocks)
        feas = cm.feasible(M)
        prof = sc.profile()
        server_gb = (prof.device_param_bytes[-1] - prof.device_param_bytes[0]) / 1e9
        for i, n in enumerate(names):
            top = int(np.flatnonzero(feas[i]).max(initial=-1))
            rows.append({"model": m, "n_cuts": cm.n_cuts, "device": n, "board": specs[n].board,
                         "training_memory_gb": M[i] / 1e9, "memory_cut0_gb": cm.device_memory_bytes[0] / 1e9,
                         "memory_device_only_gb": cm.device_memory_bytes[-1] / 1e9, "max_feasible_cut": top,
                         "holds_any_cut": top >= 0, "card_cut": int(d.cut_layer[i]),
                         "card_frequency_ghz": d.frequency_hz[i] / 1e9, "server_weights_cut0_gb": server_gb})
    return pd.DataFrame(rows)


def card_runtime(scenario: Scenario | None = None, models=MODELS, fleet_sizes=FLEET_SIZES, rounds: int = 100,
                 seed: int = 0, repeats: int = 3) -> pd.DataFrame:
    """Wall-clock seconds CARD takes to decide every device-round of a fleet (best of ``repeats``, after one warm-up).

    Columns: model, n_cuts, num_devices, rounds, device_rounds, card_s. Timing only: not deterministic.
    """
    scenario = Scenario() if scenario is None else scenario
    V.check_int_range("repeats", repeats, 1, 1000)
    rows = []
    for m in models:
        for n in fleet_sizes:
            sc, cm, args, _ = _fleet_decisions(scenario, m, int(n), rounds, seed)  # also the warm-up
            best = np.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                card(cm, *args, sc.w, discrete_clocks=sc.discrete_clocks)
                best = min(best, time.perf_counter() - t0)
            rows.append({"model": m, "n_cuts": cm.n_cuts, "num_devices": int(n), "rounds": int(rounds),
                         "device_rounds": int(n) * int(rounds), "card_s": best})
    return pd.DataFrame(rows)

"""Inverse reproduction: which modelling choices reproduce the paper's Device 1..5 pattern and reductions.

Samples the unknowns (schedule, w, device throughput basis, utilisation, channel, I, B, s, fixed cut, benchmark
set, averaging rule), checks each sample against the claims C1..C4 and summarises. kappa is not sampled: with
server-only references it cancels from U (docs/model.md "D2"). Source: docs/model.md, "Inverse reproduction".
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.experiments.analytic import (BENCHMARK_SETS, PAPER_DELAY_REDUCTION, PAPER_ENERGY_REDUCTION, _pattern,
                                            average_reductions, policy_comparison)
from splitlora.model.baselines import AVERAGING
from splitlora.model.hardware import CHANNEL_STATES, PRECISIONS, ChannelSpec, load_channel
from splitlora.model.scenario import Scenario
from splitlora.model.system import SCHEDULES

#: Tolerance of C3 and C4 (reduction within +-5 points of the paper's).
TOLERANCE = 0.05
#: The sampled unknowns and their ranges (docs/model.md "Inverse reproduction").
SPACE = {
    "schedule": SCHEDULES, "precision": PRECISIONS, "benchmark_set": tuple(BENCHMARK_SETS),
    "averaging": AVERAGING, "steps_per_round": (1, 2, 5, 10, 20), "batch_size": (1, 2, 4, 8),
    "seq_len": (128, 256, 512, 1024), "w": (0.05, 0.95), "device_utilisation": (0.1, 0.6),
    "bandwidth_mhz": (5.0, 100.0), "snr_normal_db": (0.0, 25.0), "snr_spread_db": (3.0, 15.0),
}


def sample_parameters(n_samples: int, seed: int = 0, n_cuts: int = 32) -> pd.DataFrame:
    """``n_samples`` draws of the unknowns (one row each), seeded. Continuous ones uniform (bandwidth log-uniform);
    fixed_cut "memory limit" (each device's largest cut that fits) with probability 1/2, else uniform over 0..L."""
    V.check_int_range("n_samples", n_samples, 1, 10**6)
    rng = np.random.default_rng(seed)
    pick = lambda k: [SPACE[k][i] for i in rng.integers(0, len(SPACE[k]), n_samples)]  # noqa: E731
    out = {k: pick(k) for k in ("schedule", "precision", "benchmark_set", "averaging", "steps_per_round",
                                "batch_size", "seq_len")}
    index = rng.integers(0, n_cuts + 1, n_samples)
    out["fixed_cut"] = [str(i) if m else "memory limit" for i, m in zip(index, rng.random(n_samples) < 0.5)]
    for k in ("w", "device_utilisation", "snr_normal_db", "snr_spread_db"):
        out[k] = rng.uniform(*SPACE[k], n_samples)
    lo, hi = np.log(SPACE["bandwidth_mhz"])
    out["bandwidth_mhz"] = np.exp(rng.uniform(lo, hi, n_samples))
    return pd.DataFrame(out)


def sample_scenario(params, base: Scenario | None = None):
    """(Scenario, (Good, Normal, Poor) rates in bit/s, fixed cut) of one sample's parameters."""
    base = Scenario() if base is None else base
    fixed = params["fixed_cut"] if params["fixed_cut"] == "memory limit" else int(params["fixed_cut"])
    return _scenario(params, base), _rates(params), fixed


def _scenario(params, base: Scenario) -> Scenario:
    eta = float(np.mean([d.utilisation for d in base.device_specs().values()]))  # the profiles' own utilisation
    return replace(base, schedule=params["schedule"], precision=params["precision"], w=float(params["w"]),
                   steps_per_round=int(params["steps_per_round"]), batch_size=int(params["batch_size"]),
                   seq_len=int(params["seq_len"]),
                   compute_scale=base.compute_scale * float(params["device_utilisation"]) / eta)


def _rates(params) -> np.ndarray:
    snr = float(params["snr_normal_db"])
    spread = float(params["snr_spread_db"])
    base = load_channel()
    return ChannelSpec(float(params["bandwidth_mhz"]) * 1e6, dict(zip(CHANNEL_STATES, (snr + spread, snr, snr - spread))),
                       base.transition).rates_bps()


def evaluate_sample(params, base: Scenario | None = None, rounds: int = 10, seed: int = 0) -> dict:
    """The claims of one sample: CARD's cuts and clocks per device (Normal channel), its reductions against the
    sample's benchmark set by its averaging rule (Markov channels, ``rounds`` rounds), and C1..C4.

    Returns: {cuts, clocks_ghz, delay_reduction, energy_reduction, c1, c2, c3, c4, accepted, distance}; distance =
    |delay - 70.8%| + |energy - 53.1%| + 1 per failed C1 / C2 (0 when every claim holds exactly).
    """
    sc, rates, fixed = sample_scenario(params, base)
    pattern = _pattern(sc, rates)
    c1, c2 = pattern["c1"], pattern["c2"]
    comp = policy_comparison(sc, rounds=rounds, seed=seed, conditions=("Markov",), fixed_cut=fixed, rates_bps=rates)
    red = average_reductions(comp, "Markov", BENCHMARK_SETS[params["benchmark_set"]], params["averaging"])
    d, e = red["delay_reduction"], red["energy_reduction"]
    c3 = bool(np.isfinite(d) and abs(d - PAPER_DELAY_REDUCTION) <= TOLERANCE)
    c4 = bool(np.isfinite(e) and abs(e - PAPER_ENERGY_REDUCTION) <= TOLERANCE)
    dist = (abs(d - PAPER_DELAY_REDUCTION) if np.isfinite(d) else 1.0) + \
        (abs(e - PAPER_ENERGY_REDUCTION) if np.isfinite(e) else 1.0) + (not c1) + (not c2)
    return {"cuts": pattern["cuts"], "clocks_ghz": pattern["clocks"],
            "delay_reduction": d, "energy_reduction": e, "c1": c1, "c2": c2, "c3": c3, "c4": c4,
            "accepted": c1 and c2 and c3 and c4, "distance": float(dist)}


def inverse_reproduction(n_samples: int = 400, seed: int = 0, rounds: int = 10,
                         base: Scenario | None = None, refine: int = 0) -> pd.DataFrame:
    """Every sample of :func:`sample_parameters` with its :func:`evaluate_sample` result, one row each (seeded,
    deterministic), then ``refine`` samples of :func:`refine_samples` around the closest ones. Columns: stage
    ("uniform" or "refined"), the sampled parameters, cuts, clocks_ghz, delay_reduction, energy_reduction, c1..c4,
    accepted, distance, confirmed (refined rows: accepted again on other channel draws; NaN for uniform rows)."""
    V.check_int_range("refine", refine, 0, 10**6)
    base = Scenario() if base is None else base
    samples = sample_parameters(n_samples, seed, base.cost_model().n_cuts)
    rows = [{"stage": "uniform", **p, **evaluate_sample(p, base, rounds, seed)} for p in samples.to_dict("records")]
    table = pd.DataFrame(rows)
    if refine:
        table = pd.concat([table, refine_samples(table, refine, seed, rounds, base)], ignore_index=True)
    return table


#: Steps of :func:`refine_samples` per continuous parameter (bandwidth: of its natural logarithm).
REFINE_STEPS = {"w": 0.05, "device_utilisation": 0.03, "bandwidth_mhz": 0.15, "snr_normal_db": 1.0,
                "snr_spread_db": 0.7}


def refine_samples(table: pd.DataFrame, n_samples: int, seed: int = 0, rounds: int = 10,
                   base: Scenario | None = None, n_starts: int = 4) -> pd.DataFrame:
    """A seeded local search around the ``n_starts`` uniform samples of ``table`` closest to the claims (accepted
    first): each of ``n_samples`` steps perturbs one chain's continuous parameters (normal steps of
    :data:`REFINE_STEPS`, clipped to :data:`SPACE`; the discrete choices stay) and moves the chain when the distance
    falls. The search lowers the distance on the channel draws of ``seed``, so an accepted refined sample is
    evaluated again on other draws (seed + 1) with 4 x ``rounds`` rounds: ``confirmed`` says whether it is still
    accepted. It shows where the claims hold near the closest samples; its samples are not uniform, so they do
    not enter :func:`acceptance`. Returns rows as :func:`inverse_reproduction` with stage "refined".

    Raises: InvalidParameterError for counts out of range or a table without uniform samples or their columns.
    """
    V.check_int_range("n_samples", n_samples, 1, 10**6)
    V.check_int_range("n_starts", n_starts, 1, 10**3)
    need = list(SPACE) + ["fixed_cut", "accepted", "distance"]
    missing = [k for k in need if k not in table]
    if missing:
        raise InvalidParameterError(f"table is missing columns {missing}: must be a table of inverse_reproduction")
    if "stage" in table:
        table = table[table.stage == "uniform"]
    if table.empty:
        raise InvalidParameterError("table has no uniform samples: must hold at least one row of inverse_reproduction")
    base = Scenario() if base is None else base
    order = table.sort_values(["accepted", "distance"], ascending=[False, True], kind="stable")
    chains = [({k: _plain(r[k]) for k in list(SPACE) + ["fixed_cut"]}, float(r["distance"]))
              for _, r in order.head(n_starts).iterrows()]
    rng = np.random.default_rng([seed, 1])
    rows = []
    for k in range(n_samples):
        p, dist = chains[k % len(chains)]
        q = dict(p)
        for name, step in REFINE_STEPS.items():
            lo, hi = SPACE[name]
            if name == "bandwidth_mhz":
                q[name] = float(np.exp(np.clip(np.log(p[name]) + rng.normal(0, step), np.log(lo), np.log(hi))))
            else:
                q[name] = float(np.clip(p[name] + rng.normal(0, step), lo, hi))
        out = evaluate_sample(q, base, rounds, seed)
        confirmed = bool(evaluate_sample(q, base, 4 * rounds, seed + 1)["accepted"]) if out["accepted"] else False
        rows.append({"stage": "refined", **q, **out, "confirmed": confirmed})
        if out["distance"] < dist:
            chains[k % len(chains)] = (q, out["distance"])
    return pd.DataFrame(rows)


def _plain(x):
    return x.item() if hasattr(x, "item") else x


def acceptance(table: pd.DataFrame, by=("schedule", "benchmark_set")) -> pd.DataFrame:
    """Share of the uniform samples accepted (and of each claim holding) per group of ``by`` (columns; default
    schedule and benchmark set); the refined ones (stage "refined") are left out: they are not a uniform draw."""
    if "stage" in table:
        table = table[table.stage == "uniform"]
    g = table.groupby(list(by))
    out = g[["c1", "c2", "c3", "c4", "accepted"]].mean().add_suffix("_share")
    return out.assign(samples=g.size()).reset_index()


def accepted_ranges(table: pd.DataFrame) -> pd.DataFrame:
    """Min and max of each continuous parameter over the accepted samples, per stage and schedule, with how many
    (accepted) and, for refined samples, how many were accepted again on other channel draws (confirmed)."""
    cont = ["w", "device_utilisation", "bandwidth_mhz", "snr_normal_db", "snr_spread_db"]
    acc = table[table.accepted]
    if "stage" not in acc:
        acc = acc.assign(stage="uniform")
    if acc.empty:
        return pd.DataFrame(columns=["stage", "schedule", "parameter", "min", "max", "accepted", "confirmed"])
    rows = [{"stage": st, "schedule": s, "parameter": p, "min": float(g[p].min()), "max": float(g[p].max()),
             "accepted": len(g),
             "confirmed": int(g["confirmed"].astype(bool).sum()) if st == "refined" and "confirmed" in g else np.nan}
            for (st, s), g in acc.groupby(["stage", "schedule"]) for p in cont]
    return pd.DataFrame(rows)


def closest_sample(table: pd.DataFrame) -> dict:
    """The parameters of the sample with the smallest distance to all claims (accepted ones first), as a dict."""
    t = table.sort_values(["accepted", "distance"], ascending=[False, True], kind="stable")
    row = t.iloc[0]
    return {k: _plain(row[k]) for k in list(SPACE) + ["fixed_cut"]}

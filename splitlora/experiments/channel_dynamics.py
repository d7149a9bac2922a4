"""The paper's first open question: the channel changes within a round. Each policy's delay, energy and regret.

The ``channel_dynamics`` notebook only calls these and plots (docs/model.md "Channel dynamics"). Deterministic for
a given seed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from splitlora import _validate as V
from splitlora.model.channel import PROCESSES, load_fading, minibatch_rates_bps
from splitlora.model.dynamics import DYNAMIC_POLICIES, dynamic_policies
from splitlora.model.scenario import Scenario

COHERENCE_STEPS = (1, 2, 5, 10, 20, 50, 100, 1000)


def policy_regret(scenario: Scenario | None = None, processes=PROCESSES, coherence_steps=COHERENCE_STEPS,
                  rounds: int = 200, seed: int = 0, policies=DYNAMIC_POLICIES) -> pd.DataFrame:
    """Every policy under each channel process and coherence time (in mini-batches), the scenario's devices.

    Columns: process, coherence_steps, coherence_rounds (= coherence_steps / steps_per_round), policy, mean_delay_s,
    mean_energy_j (per device-round), mean_objective, regret (mean of U - U_oracle, >= 0), relative_regret
    (sum(U - U_oracle) / sum(U_oracle)), delay_vs_oracle and energy_vs_oracle (sum / the oracle's sum - 1),
    worse_fraction (device-rounds where U exceeds the oracle's by more than 1e-9 relative). Sums over device-rounds
    where the oracle is feasible. Raises InvalidParameterError for bad input (naming it).
    """
    scenario = Scenario() if scenario is None else scenario
    V.check_int_range("rounds", rounds, 1, 10**6)
    model = scenario.cost_model()
    P, M = scenario.device_arrays()
    I = scenario.steps_per_round
    policies = tuple(policies) if "oracle" in policies else tuple(policies) + ("oracle",)
    rows = []
    for process in processes:
        for tau in coherence_steps:
            R, expected = minibatch_rates_bps(process, rounds, I, len(P), int(tau), seed=seed)
            res = dynamic_policies(model, P, M, R, expected, scenario.w, discrete_clocks=scenario.discrete_clocks,
                                   policies=policies)
            o = res["oracle"]
            ok = o.feasible
            for name, d in res.items():
                du = d.objective[ok] - o.objective[ok]
                rows.append({"process": process, "coherence_steps": int(tau), "coherence_rounds": int(tau) / I,
                             "policy": name, "mean_delay_s": float(d.delay_s[ok].mean()),
                             "mean_energy_j": float(d.energy_j[ok].mean()),
                             "mean_objective": float(d.objective[ok].mean()),
                             "regret": float(du.mean()), "relative_regret": float(du.sum() / o.objective[ok].sum()),
                             "delay_vs_oracle": float(d.delay_s[ok].sum() / o.delay_s[ok].sum() - 1),
                             "energy_vs_oracle": float(d.energy_j[ok].sum() / o.energy_j[ok].sum() - 1)
                             if o.energy_j[ok].sum() > 0 else np.nan,
                             "worse_fraction": float(np.mean(d.objective[ok] > o.objective[ok] * (1 + 1e-9)))})
    return pd.DataFrame(rows)


def fading_context(table: pd.DataFrame, steps_per_round: int) -> dict:
    """Where data/channel.yaml's fading sits on the coherence axis: Doppler (Hz), coherence time (s), the oracle's
    mean mini-batch time (s, from ``table``) and the coherence time in mini-batches."""
    f = load_fading()
    o = table[table.policy == "oracle"]
    minibatch_s = float(o.mean_delay_s.mean() / steps_per_round)
    return {"doppler_hz": f.doppler_hz, "coherence_time_s": f.coherence_time_s, "minibatch_s": minibatch_s,
            "coherence_minibatches": f.coherence_time_s / minibatch_s}

"""The benchmark policies CARD is compared against, evaluated with the same cost model as CARD.

:func:`run_policies` gives each policy's :class:`~splitlora.model.card.Decision` for K device-rounds; a cut layer
that does not fit in a device's memory is reported infeasible, never silently replaced.
Source: docs/model.md, "Benchmarks" (the table of policies).
"""
from __future__ import annotations

import numpy as np

from splitlora.errors import InvalidParameterError
from splitlora.model.card import Decision, best_clock_hz, card, exhaustive_search
from splitlora.model.system import CostModel, check_weight, device_round_inputs, objective

POLICIES = ("CARD", "server-only", "device-only", "fixed cut", "random cut", "CARD cut, f_max",
            "CARD clock, fixed cut", "exhaustive")


def evaluate_policy(model: CostModel, cut_layer, f_hz, device_flops_per_s, rate_up_bps, rate_down_bps,
                    memory_bytes, w: float) -> Decision:
    """Costs of given (cut layer, clock) decisions, (K,) each; infeasible where the cut does not fit.

    Raises: ValueError for a cut layer outside 0..L, a clock outside [f_min, f_max], w outside [0, 1].
    """
    check_weight(w)
    P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
    c = np.broadcast_to(np.asarray(cut_layer).reshape(-1), P.shape).astype(np.int64)
    f = np.broadcast_to(np.asarray(f_hz, dtype=float).reshape(-1), P.shape)
    ok = model.feasible(np.broadcast_to(np.asarray(memory_bytes, dtype=float).reshape(-1), P.shape))
    feasible = ok[np.arange(len(c)), np.clip(c, 0, model.n_cuts)]
    T, E = model.evaluate(c, np.where(c == model.n_cuts, model.f_max_hz, f), P, Ru, Rd)
    t_ref, e_ref = model.references(P, Ru, Rd)
    U = objective(T, E, t_ref, e_ref, w)
    return Decision.masked(feasible, c, np.where(c == model.n_cuts, 0.0, f), T, E, U)


def run_policies(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float, *,
                 seed: int = 0, discrete_clocks: bool = False, policies=POLICIES) -> dict[str, Decision]:
    """Decisions of every policy in ``policies`` for the same K device-rounds.

    Args: as :func:`splitlora.model.card.card`; seed: for "random cut"; discrete_clocks: CARD picks from the clock table.
    Returns: {policy name: Decision}.
    Raises: ValueError for an unknown policy name (listing the known ones) or bad inputs.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InvalidParameterError(f"policies={unknown!r} is invalid: must be names from {list(POLICIES)}")
    P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
    M = np.broadcast_to(np.asarray(memory_bytes, dtype=float).reshape(-1), P.shape)
    L, fmax, K = model.n_cuts, model.f_max_hz, P.shape[0]
    args = (P, Ru, Rd, M, w)
    out: dict[str, Decision] = {}
    best = card(model, *args, discrete_clocks=discrete_clocks)
    for name in policies:
        if name == "CARD":
            out[name] = best
        elif name == "server-only":
            out[name] = evaluate_policy(model, 0, fmax, *args)
        elif name == "device-only":
            out[name] = evaluate_policy(model, L, fmax, *args)
        elif name == "fixed cut":
            out[name] = evaluate_policy(model, L // 2, fmax, *args)
        elif name == "random cut":
            ok = model.feasible(M)
            rng = np.random.default_rng(seed)
            # uniform over each row's feasible cut layers: the argmax of random keys on feasible entries
            keys = np.where(ok, rng.random(ok.shape), -1.0)
            out[name] = evaluate_policy(model, keys.argmax(1), fmax, *args)
        elif name == "CARD cut, f_max":
            c = np.where(best.feasible, best.cut_layer, 0)
            out[name] = evaluate_policy(model, c, fmax, *args)
        elif name == "CARD clock, fixed cut":
            f = best_clock_hz(model, np.full(K, L // 2), P, Ru, Rd, w, discrete_clocks=discrete_clocks)
            out[name] = evaluate_policy(model, L // 2, f, *args)
        elif name == "exhaustive":
            out[name] = exhaustive_search(model, *args)
    return out

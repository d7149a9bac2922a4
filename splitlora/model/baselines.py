"""The benchmark policies CARD is compared against, evaluated with the same cost model as CARD.

:func:`run_policies` gives each policy's :class:`~splitlora.model.card.Decision` for K device-rounds; a cut layer
that does not fit in a device's memory is reported infeasible, never silently replaced.
Source: docs/model.md, "Benchmarks" (the table of policies).
"""
from __future__ import annotations

import numpy as np

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.card import Decision, best_clock_hz, card, exhaustive_search
from splitlora.model.parallel import _decision, _stages, allocate, card_parallel
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


def _fixed_cuts(model: CostModel, fixed_cut, ok):
    """The fixed-cut benchmark's cut per device-round: an int in 0..L for all, or "memory limit" (each device's
    largest cut that fits; 0 where none does). ``ok``: feasibility (K, L+1)."""
    if isinstance(fixed_cut, str):
        V.check_choice("fixed_cut", fixed_cut, ("memory limit",))
        return np.where(ok, np.arange(model.n_cuts + 1), -1).max(1).clip(0)
    V.check_int_range("fixed_cut", fixed_cut, 0, model.n_cuts)
    return np.full(ok.shape[0], int(fixed_cut))


def run_policies(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float, *,
                 seed: int = 0, discrete_clocks: bool = False, policies=POLICIES,
                 fixed_cut=None) -> dict[str, Decision]:
    """Decisions of every policy in ``policies`` for the same K device-rounds (per-device schedules).

    Args: as :func:`splitlora.model.card.card`; seed: for "random cut"; discrete_clocks: CARD picks from the clock table;
        fixed_cut: the "fixed cut" benchmark's cut layer, an int in 0..L (default L // 2) or "memory limit".
    Returns: {policy name: Decision}.
    Raises: ValueError for an unknown policy name (listing the known ones) or bad inputs.
    """
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise InvalidParameterError(f"policies={unknown!r} is invalid: must be names from {list(POLICIES)}")
    P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
    M = np.broadcast_to(np.asarray(memory_bytes, dtype=float).reshape(-1), P.shape)
    L, fmax = model.n_cuts, model.f_max_hz
    args = (P, Ru, Rd, M, w)
    out: dict[str, Decision] = {}
    fixed = _fixed_cuts(model, L // 2 if fixed_cut is None else fixed_cut, model.feasible(M))
    best = card(model, *args, discrete_clocks=discrete_clocks)
    for name in policies:
        if name == "CARD":
            out[name] = best
        elif name == "server-only":
            out[name] = evaluate_policy(model, 0, fmax, *args)
        elif name == "device-only":
            out[name] = evaluate_policy(model, L, fmax, *args)
        elif name == "fixed cut":
            out[name] = evaluate_policy(model, fixed, fmax, *args)
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
            f = best_clock_hz(model, fixed, P, Ru, Rd, w, discrete_clocks=discrete_clocks)
            out[name] = evaluate_policy(model, fixed, f, *args)
        elif name == "exhaustive":
            out[name] = exhaustive_search(model, *args)
    return out


def run_policies_rounds(model: CostModel, device_flops_per_s, rate_up_bps, rate_down_bps, memory_bytes, w: float, *,
                        seed: int = 0, discrete_clocks: bool = False, policies=POLICIES,
                        fixed_cut=None) -> dict[str, Decision]:
    """Decisions of every policy for N rounds of M devices under any schedule: inputs (N, M), Decisions (N, M).

    Per-device schedules: :func:`run_policies` on the flattened device-rounds. Parallel schedules: "f_max" means
    the equal share f_max / M of every device (the clock of the reference, docs/model.md "Parallel schedule");
    "CARD clock, fixed cut" allocates the shares for the fixed cuts (:func:`splitlora.model.parallel.allocate`);
    "exhaustive" is not offered (brute force over (L+1)^M cut combinations).
    Raises: InvalidParameterError for an unknown policy, "exhaustive" under a parallel schedule, bad inputs.
    """
    P = np.asarray(device_flops_per_s, dtype=float)
    if P.ndim != 2:
        raise InvalidParameterError(f"device_flops_per_s has shape {P.shape}: must be (rounds, devices)")
    shape = P.shape
    arrs = [np.broadcast_to(np.asarray(a, dtype=float), shape) for a in (P, rate_up_bps, rate_down_bps, memory_bytes)]
    if not model.parallel:
        out = run_policies(model, *(a.reshape(-1) for a in arrs), w, seed=seed, discrete_clocks=discrete_clocks,
                           policies=policies, fixed_cut=fixed_cut)
        return {k: Decision(*(getattr(d, f).reshape(shape) for f in
                              ("cut_layer", "frequency_hz", "delay_s", "energy_j", "objective", "feasible")))
                for k, d in out.items()}
    unknown = [p for p in policies if p not in POLICIES or p == "exhaustive"]
    if unknown:
        raise InvalidParameterError(f"policies={unknown!r} is invalid under schedule={model.schedule!r}: must be names "
                                    f"from {[p for p in POLICIES if p != 'exhaustive']}")
    P, Ru, Rd, M = arrs
    L, Md = model.n_cuts, shape[1]
    ok = model.feasible(M.reshape(-1)).reshape(shape + (L + 1,))
    t_d, t_l, t_h = _stages(model, P, Ru, Rd)
    t_ref, e_ref = model.parallel_references(P, Ru, Rd)
    equal = model.f_max_hz / Md
    best = card_parallel(model, P, Ru, Rd, M, w, discrete_clocks=discrete_clocks)
    fixed = _fixed_cuts(model, L // 2 if fixed_cut is None else fixed_cut, ok.reshape(-1, L + 1)).reshape(shape)

    def at(c, f=None):
        c = np.asarray(np.broadcast_to(c, shape), dtype=np.int64)
        fits = np.take_along_axis(ok, c[..., None], -1)[..., 0].all(1)
        if f is None:
            f = np.full(shape, equal)
        return _decision(model, c, f, P, Ru, Rd, t_ref, e_ref, w, fits)

    out: dict[str, Decision] = {}
    for name in policies:
        if name == "CARD":
            out[name] = best
        elif name == "server-only":
            out[name] = at(0)
        elif name == "device-only":
            out[name] = at(L)
        elif name == "fixed cut":
            out[name] = at(fixed)
        elif name == "random cut":
            keys = np.where(ok, np.random.default_rng(seed).random(ok.shape), -1.0)
            out[name] = at(keys.argmax(-1))
        elif name == "CARD cut, f_max":
            out[name] = at(np.where(best.feasible, best.cut_layer, 0))
        elif name == "CARD clock, fixed cut":
            pick = lambda a: np.take_along_axis(a, fixed[..., None], -1)[..., 0]  # noqa: E731
            f, _ = allocate(model, fixed, pick(t_d), pick(t_l), pick(t_h), t_ref, e_ref, w,
                            discrete_clocks=discrete_clocks)
            out[name] = at(fixed, f)
    return out


AVERAGING = ("pooled", "per round")


def reductions(card_decision: Decision, benchmark: Decision, parallel: bool) -> dict:
    """CARD's delay and energy reductions against one benchmark, (N, M) Decisions of the same rounds, by both
    averaging rules (docs/model.md "Benchmarks"):

    - "pooled": 1 - sum(CARD) / sum(benchmark) over the device-rounds where both are feasible (delay: each
      device's own round delay, its finish time under the parallel schedules);
    - "per round": the mean over rounds of 1 - CARD's round / the benchmark's round, over rounds where both are
      feasible for every device; a round's delay is the sum of its devices' (one after another) or their max
      (parallel), its energy the sum. NaN where the benchmark's total is 0 (e.g. device-only energy).
    Returns: {"delay_pooled", "energy_pooled", "delay_per_round", "energy_per_round"}.
    """
    ok = card_decision.feasible & benchmark.feasible
    out = {}
    for key, attr in (("delay", "delay_s"), ("energy", "energy_j")):
        a, b = getattr(card_decision, attr), getattr(benchmark, attr)
        sb = b[ok].sum()
        out[f"{key}_pooled"] = float(1 - a[ok].sum() / sb) if sb > 0 else np.nan
        rows = ok.all(1)
        if key == "delay" and parallel:
            ra, rb = a[rows].max(1), b[rows].max(1)
        else:
            ra, rb = a[rows].sum(1), b[rows].sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = 1 - ra / rb
        out[f"{key}_per_round"] = float(np.mean(r)) if rows.any() and np.all(rb > 0) else np.nan
    return out

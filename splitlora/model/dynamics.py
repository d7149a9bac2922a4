"""Decisions when the channel changes within a round: the paper's policy, three alternatives and an oracle.

Built on :class:`~splitlora.model.system.CostModel` (stage times, round delay, server energy) and CARD; the rates of
K device-rounds have shape (K, I), one per mini-batch, equal on the uplink and the downlink, the adapter hand-over
at the last mini-batch's rate. Sequential schedule only. Source: docs/model.md, "Channel dynamics".
"""
from __future__ import annotations

import numpy as np

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.card import Decision, best_clock_hz, card, optimal_frequency_hz
from splitlora.model.system import CostModel, check_weight, device_round_inputs, objective

DYNAMIC_POLICIES = ("first state", "expected rate", "previous round", "per-mini-batch clock", "oracle")


def _stages(model: CostModel, device_flops_per_s, rates_bps):
    """Per cut (K, L+1): T_d, mean over the round's mini-batches of T_l, and the hand-over time at the last rate."""
    if model.schedule != "sequential":
        raise InvalidParameterError(f"schedule={model.schedule!r} is invalid here: per-mini-batch rates need "
                                    "'sequential' (the round delay of the other schedules assumes constant stages)")
    R = np.asarray(rates_bps, dtype=float)
    if R.ndim != 2 or R.shape[1] != model.iterations:
        raise InvalidParameterError(f"rates_bps has shape {R.shape}: must be (K, {model.iterations}) = "
                                    "(device-rounds, steps_per_round)")
    K, I = R.shape
    P, _, _ = device_round_inputs(device_flops_per_s, R[:, 0], R[:, 0])
    t_d, t_l, t_h = model.stage_times_s(np.repeat(P, I), R.reshape(-1), R.reshape(-1))   # (K I, L+1)
    return t_d[::I], t_l.reshape(K, I, -1).mean(1), t_h[I - 1::I]


def round_costs(model: CostModel, cut_layer, f_hz, device_flops_per_s, rates_bps):
    """Round delay (s) and server energy (J) of K device-rounds whose link rate changes per mini-batch.

    Args:
        cut_layer: (K,) ints in 0..L; f_hz: server clock (K,) or one per mini-batch (K, I) (Hz; ignored where c = L);
        device_flops_per_s: P_d (K,) (FLOP/s); rates_bps: (K, I) (bit/s).
    Returns: (delay_s, energy_j), each (K,): sum over mini-batches of T_d + T_l,i + T_s,i plus the hand-over,
        and sum of the mini-batches' server energy (:meth:`CostModel.round_delay_s`, :meth:`server_energy_j`).
    Raises: InvalidParameterError for a schedule other than "sequential", shapes or values out of range.
    """
    t_d, t_l, t_h = _stages(model, device_flops_per_s, rates_bps)
    K, I = np.shape(rates_bps)
    c = np.asarray(cut_layer).reshape(-1)
    V.check_int_range("cut_layer", c, 0, model.n_cuts)
    c = np.broadcast_to(c.astype(np.int64), (K,))
    f = np.asarray(f_hz, dtype=float)
    f = np.broadcast_to(f if f.ndim == 2 else f.reshape(-1, 1), (K, I))
    f = np.where((c < model.n_cuts)[:, None], f, model.f_max_hz)
    rows = np.arange(K)
    t_s = model.server_time_s(c[:, None], f).mean(1)
    delay = model.round_delay_s(t_d[rows, c], t_l[rows, c], t_h[rows, c], t_s)
    return delay, model.server_energy_j(c[:, None], f).mean(1)


def round_references(model: CostModel, device_flops_per_s, rates_bps):
    """(T_ref, E_ref), each (K,): :func:`round_costs` of the server-only benchmark (c = 0) at f_max."""
    K = np.shape(rates_bps)[0]
    return round_costs(model, np.zeros(K, dtype=np.int64), model.f_max_hz, device_flops_per_s, rates_bps)


def oracle(model: CostModel, device_flops_per_s, rates_bps, memory_bytes, w: float, *,
           discrete_clocks: bool = False) -> Decision:
    """The best (cut layer, clock) of each round knowing every mini-batch's rate, (K,) each.

    For a fixed cut, U = w T / T_ref + (1 - w) E / E_ref is a / f + b f^2 + const in each mini-batch's clock with the
    same a, b for every mini-batch, so one clock per round is optimal: CARD's closed form
    (:func:`~splitlora.model.card.optimal_frequency_hz`) with the round's references, then the best feasible cut.
    """
    check_weight(w)
    t_d, t_l, t_h = _stages(model, device_flops_per_s, rates_bps)
    K = t_d.shape[0]
    t_ref, e_ref = round_references(model, device_flops_per_s, rates_bps)
    cuts = np.broadcast_to(np.arange(model.n_cuts + 1)[None, :], t_d.shape)
    f = optimal_frequency_hz(model, np.broadcast_to(t_ref[:, None], t_d.shape), e_ref[:, None], w,
                             discrete_clocks=discrete_clocks, cut_layer=cuts)
    T = model.round_delay_s(t_d, t_l, t_h, model.server_time_s(cuts, f))
    E = model.server_energy_j(cuts, f)
    ok = model.feasible(np.broadcast_to(np.asarray(memory_bytes, dtype=float).reshape(-1), (K,)))
    U = np.where(ok, objective(T, E, t_ref[:, None], e_ref[:, None], w), np.inf)
    c = U.argmin(1)
    rows = np.arange(K)
    return Decision.masked(ok[rows, c], c, np.where(c == model.n_cuts, 0.0, f[rows, c]), T[rows, c], E[rows, c],
                           U[rows, c])


def _outcome(model, c, f, P, R, M, w) -> Decision:
    """Round costs and objective of decisions c (K,), f (K,) or (K, I); infeasible where c = -1."""
    feasible = c >= 0
    c0 = np.where(feasible, c, 0)
    f = np.where(np.isfinite(f), f, model.f_max_hz)
    T, E = round_costs(model, c0, f, P, R)
    t_ref, e_ref = round_references(model, P, R)
    U = objective(T, E, t_ref, e_ref, w)
    f_mean = np.asarray(f, dtype=float).reshape(len(c), -1).mean(1)
    return Decision.masked(feasible, c0, np.where(c0 == model.n_cuts, 0.0, f_mean), T, E, U)


def dynamic_policies(model: CostModel, device_flops_per_s, memory_bytes, rates_bps, expected_rate_bps, w: float, *,
                     discrete_clocks: bool = False, policies=DYNAMIC_POLICIES) -> dict[str, Decision]:
    """Each policy's decisions and their round costs for N rounds of M devices, rows k = n M + m.

    Args:
        device_flops_per_s, memory_bytes: (M,) (FLOP/s, byte); rates_bps: (N, M, I) per-mini-batch rates (bit/s);
        expected_rate_bps: E[R] (scalar or (M,)) (bit/s); w, discrete_clocks: as :func:`card`.
    Policies (docs/model.md "Channel dynamics"): "first state" (the paper: CARD once per round on the round's
    first mini-batch's rate), "expected rate" (CARD on E[R]), "previous round" (CARD on the previous round's
    measured rate, bits over seconds = the harmonic mean of its mini-batch rates; E[R] in round 0),
    "per-mini-batch clock" (the first state's cut, CARD's clock re-decided at every mini-batch's rate),
    "oracle" (:func:`oracle`). The objective is the round's, with :func:`round_references`.
    Returns: {policy: Decision (K,)}; ``frequency_hz`` is the round's mean clock.
    Raises: InvalidParameterError for an unknown policy, shapes or values out of range.
    """
    unknown = [p for p in policies if p not in DYNAMIC_POLICIES]
    if unknown:
        raise InvalidParameterError(f"policies={unknown!r} is invalid: must be names from {list(DYNAMIC_POLICIES)}")
    check_weight(w)
    R3 = np.asarray(rates_bps, dtype=float)
    if R3.ndim != 3 or R3.shape[2] != model.iterations:
        raise InvalidParameterError(f"rates_bps has shape {R3.shape}: must be (rounds, devices, {model.iterations}) "
                                    "(the last axis: steps_per_round)")
    N, M_, I = R3.shape
    P = np.broadcast_to(np.asarray(device_flops_per_s, dtype=float).reshape(-1), (M_,))
    Mem = np.broadcast_to(np.asarray(memory_bytes, dtype=float).reshape(-1), (M_,))
    Re = np.broadcast_to(np.asarray(expected_rate_bps, dtype=float).reshape(-1), (M_,))
    V.check_positive("expected_rate_bps", Re)
    PK, MK, R = np.tile(P, N), np.tile(Mem, N), R3.reshape(N * M_, I)
    harmonic = I / (1.0 / R3).sum(2)                                                   # (N, M)
    prev = np.concatenate([Re[None, :], harmonic[:-1]]).reshape(-1)

    def plan(rate):  # CARD on one rate per device-round
        d = card(model, PK, rate, rate, MK, w, discrete_clocks=discrete_clocks)
        return d.cut_layer, np.where(d.cut_layer == model.n_cuts, model.f_max_hz, d.frequency_hz)

    out: dict[str, Decision] = {}
    first = plan(R[:, 0])
    for name in policies:
        if name == "first state":
            out[name] = _outcome(model, *first, PK, R, MK, w)
        elif name == "expected rate":
            out[name] = _outcome(model, *plan(np.tile(Re, N)), PK, R, MK, w)
        elif name == "previous round":
            out[name] = _outcome(model, *plan(prev), PK, R, MK, w)
        elif name == "per-mini-batch clock":
            c = first[0]
            f = best_clock_hz(model, np.repeat(np.where(c >= 0, c, 0), I), np.repeat(PK, I), R.reshape(-1),
                              R.reshape(-1), w, discrete_clocks=discrete_clocks).reshape(-1, I)
            out[name] = _outcome(model, c, f, PK, R, MK, w)
        elif name == "oracle":
            out[name] = oracle(model, PK, R, MK, w, discrete_clocks=discrete_clocks)
    return out

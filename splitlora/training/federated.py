"""Parallel training modes beside sequential split learning: SplitFed (SFL-V2 / SFL-V1) and federated LoRA.

:func:`fedavg` averages adapters (each tensor over exactly the participants that hold it); :func:`run_parallel` runs
the rounds of a parallel mode with the nodes of a :class:`~splitlora.training.trainer.SplitTrainer` and the split step
of :mod:`splitlora.training.step`. Source: docs/split-training.md, "Training modes".
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Callable, Hashable, Mapping, Sequence

import torch

from splitlora._validate import check_choice, check_int_range, check_positive
from splitlora.errors import InvalidParameterError
from splitlora.training.node import payload_bytes, trainable_names
from splitlora.training.split import split_model
from splitlora.training.step import DeviceHalf, ServerHalf, split_step

if TYPE_CHECKING:
    from splitlora.training.trainer import SplitTrainer, StepLog

#: Training modes: devices take turns (the paper); SplitFed with one shared server-side adapter (SFL-V2) or one
#: server-side copy per device averaged at the round's end (SFL-V1); federated LoRA without a split.
MODES = ("sequential", "splitfed", "splitfed_v1", "fedlora")
PARALLEL_MODES = MODES[1:]


def fedavg(states: Sequence[Mapping[Hashable, torch.Tensor]], weights: Sequence[float]) -> dict:
    """Weighted average of ``states`` (e.g. LoRA adapters {name: tensor}), each key over exactly the states that
    hold it: out[k] = sum_{m holds k} w_m x_m[k] / sum_{m holds k} w_m (FedAvg, McMahan et al. 2017, with
    heterogeneous key sets as devices cut at different layers own different LoRA matrices). Contributions that
    are the same tensor object count once with their summed weight, so a tensor all holders share is returned
    unchanged (a clone). Keys in order of first appearance; tensors of one key must have one shape.

    Raises InvalidParameterError for a length mismatch, a negative or non-finite weight, or a key whose holders'
    weights sum to 0.
    """
    if len(states) != len(weights):
        raise InvalidParameterError(f"weights of length {len(weights)} is invalid: must hold one weight per state "
                                    f"({len(states)})")
    check_positive("weights", [float(w) for w in weights], allow_zero=True)
    groups: dict = {}
    for state, w in zip(states, weights):
        for k, t in state.items():
            g = groups.setdefault(k, {})
            tid = id(t)
            g[tid] = (t, g[tid][1] + float(w)) if tid in g else (t, float(w))
    out = {}
    for k, g in groups.items():
        total = sum(w for _, w in g.values())
        if total <= 0:
            raise InvalidParameterError(f"weights={list(weights)!r} is invalid for key {k!r}: its holders' weights "
                                        "sum to 0")
        items = list(g.values())
        if len(items) == 1:
            out[k] = items[0][0].detach().clone()
            continue
        acc = torch.zeros_like(items[0][0], dtype=torch.float64)
        for t, w in items:
            if t.shape != acc.shape:
                raise InvalidParameterError(f"state tensor {k!r} of shape {tuple(t.shape)} is invalid: must have "
                                            f"shape {tuple(acc.shape)} as in the other states")
            acc += (w / total) * t.detach().to(torch.float64)
        out[k] = acc.to(items[0][0].dtype)
    return out


def _flatten(payload: Mapping) -> dict:
    """A node payload {"params": {n: t}, "opt": {n: {field: t}}} as one flat {key: tensor} dict."""
    flat = {("params", n): t for n, t in payload["params"].items()}
    flat.update({("opt", n, f): t for n, st in payload["opt"].items() for f, t in st.items()})
    return flat


def _unflatten(flat: Mapping) -> dict:
    out = {"params": {}, "opt": {}}
    for key, t in flat.items():
        if key[0] == "params":
            out["params"][key[1]] = t
        else:
            out["opt"].setdefault(key[1], {})[key[2]] = t
    return out


def fedavg_payloads(payloads: Sequence[Mapping], weights: Sequence[float]) -> dict:
    """:func:`fedavg` of node payloads (LoRA values and their AdamW state: exp_avg, exp_avg_sq and step are
    averaged like the values, so one participant's payload comes back unchanged)."""
    return _unflatten(fedavg([_flatten(p) for p in payloads], weights))


def _subset(payload: Mapping, names: Sequence[str]) -> dict:
    return {"params": {n: payload["params"][n] for n in names},
            "opt": {n: payload["opt"][n] for n in names if n in payload["opt"]}}


def _merge(*payloads: Mapping) -> dict:
    out = {"params": {}, "opt": {}}
    for p in payloads:
        out["params"].update(p["params"])
        out["opt"].update(p["opt"])
    return out


def global_state(trainer: SplitTrainer) -> dict:
    """The trainer's whole adapter with its AdamW state, as one payload (from whichever side owns each tensor)."""
    return _merge(trainer.device.export(trainer.device.owned), trainer.server.export(trainer.server.owned))


def _load_global(trainer: SplitTrainer, state: Mapping, cut: int) -> None:
    """Put ``state`` back into the trainer's two nodes, split at ``cut``, so that adapter_state, export_adapter,
    evaluation and checkpoints see the round's global adapter."""
    d_part, _ = split_model(trainer.device.model, cut, trainer.config.granularity)
    _, s_part = split_model(trainer.server.model, cut, trainer.config.granularity)
    d_own, s_own = trainable_names(trainer.device, d_part), trainable_names(trainer.server, s_part)
    trainer.device.set_owned(d_own, _subset(state, d_own))
    trainer.server.set_owned(s_own, _subset(state, s_own))
    trainer.device.part, trainer.server.part, trainer.cut = d_part, s_part, cut


def run_parallel(trainer: SplitTrainer, device_batches, cut_of: Callable[[int, int], int], rounds: int,
                 steps_per_round: Sequence[int], mode: str, *, sample_weights: Sequence[float] | None = None,
                 checkpoint_path: str | os.PathLike | None = None, stop_after_round: int | None = None,
                 lost: Mapping[tuple[int, int], int] | None = None,
                 step_context: Callable[[int, int, int], AbstractContextManager] | None = None) -> list[StepLog]:
    """The rounds of a parallel ``mode`` (``"splitfed"``, ``"splitfed_v1"``, ``"fedlora"``) on ``trainer``.

    Round n: every device m starts from the round's global adapter (values and AdamW state) and trains
    ``steps_per_round[m]`` mini-batches ``device_batches[m][(n * I_m + i) % len]`` at cut layer ``cut_of(n, m)``
    (fedlora: c = L, no split: the device runs the whole LoRA model). The server (splitfed) serves the devices'
    smashed data round-robin: all i-th mini-batches in device order 0..M-1 before any (i+1)-th, each with one
    server update; SFL-V2 (``"splitfed"``) applies them to one shared server-side adapter, SFL-V1 to a copy per
    device. At the round's end each device's model (its device-side adapter + the server-side adapter it trained
    against) is averaged by :func:`fedavg_payloads` with weights ``sample_weights`` (default: the records each
    device holds, sum of B over ``device_batches[m]``), so each LoRA matrix is averaged over exactly the
    participants that trained it; the result is the next round's global adapter and is loaded back into
    ``trainer``. A checkpoint (if ``checkpoint_path``) is written at each round's end; rounds already done
    (``trainer.global_step``) are skipped. ``lost``: {(round, device): k} devices lost in that round after the
    server had applied their first k mini-batches (0: absent the whole round; the distributed server's rule,
    docs/distributed.md "Training modes"): their steps after the k-th are not run and their adapter is left out
    of the average; a matrix that no remaining participant holds takes the server-side copy (splitfed) or the
    round's global value. ``step_context(n, m, i)``: an optional context-manager factory entered around each split
    step (round, device, mini-batch index), e.g. the emulated run's FLOP counter (docs/model.md "Emulated run").
    Returns ``trainer.logs``.
    """
    from splitlora.training.trainer import StepLog, check_has_targets

    check_choice("mode", mode, PARALLEL_MODES)
    M = len(device_batches)
    I = [int(i) for i in steps_per_round]
    per_round = sum(I)
    if trainer.global_step % per_round:
        raise InvalidParameterError(f"trainer.global_step={trainer.global_step} is invalid for mode={mode!r}: must "
                                    f"be a multiple of the steps in a round ({per_round}); parallel modes resume "
                                    "at round ends")
    if sample_weights is None:
        sample_weights = [sum(int(b["input_ids"].shape[0]) for b in dev) for dev in device_batches]
    sample_weights = [float(w) for w in sample_weights]
    if len(sample_weights) != M:
        raise InvalidParameterError(f"sample_weights of length {len(sample_weights)} is invalid: must hold one "
                                    f"weight per device ({M})")
    check_positive("sample_weights", sample_weights)
    L, gran, cfg = trainer.num_units, trainer.config.granularity, trainer.config
    parts: dict[int, tuple] = {}

    def cut_parts(c: int):
        if c not in parts:
            d_part, _ = split_model(trainer.device.model, c, gran)
            _, s_part = split_model(trainer.server.model, c, gran)
            parts[c] = (d_part, s_part, trainable_names(trainer.device, d_part), trainable_names(trainer.server, s_part))
        return parts[c]

    first = trainer.global_step // per_round
    last = rounds if stop_after_round is None else min(rounds, stop_after_round)
    for n in range(first, last):
        glob = global_state(trainer)
        cuts = []
        for m in range(M):
            c = L if mode == "fedlora" else int(cut_of(n, m))
            check_int_range("cut_layer", c, 0, L)
            cuts.append(c)
        local = [_subset(glob, cut_parts(c)[2]) for c in cuts]
        copies = M if mode == "splitfed_v1" else 1  # SFL-V1: a server-side copy per device; else one (fedlora: unused)
        server = [_subset(glob, list(glob["params"])) for _ in range(copies)] * (M // copies)
        handover = [2 * payload_bytes(p) if p["params"] else 0 for p in local]  # download + upload
        kept = {m: (lost or {}).get((n, m), I[m]) for m in range(M)}  # mini-batches of m the server applies
        order = [(i, m) for i in range(max(I)) for m in range(M) if i < min(I[m], kept[m])]
        for i, m in order:
            d_part, s_part, d_own, s_own = cut_parts(cuts[m])
            data = device_batches[m]
            batch = data[(n * I[m] + i) % len(data)]
            for node, own, payload in ((trainer.device, d_own, local[m]), (trainer.server, s_own, server[m])):
                node.wipe()  # no optimiser state of the previous participant may carry over
                node.set_owned(own, _subset(payload, own))
            am = batch.get("attention_mask") if cfg.send_attention_mask else None
            check_has_targets(batch["labels"])
            with step_context(n, m, i) if step_context is not None else nullcontext():
                r = split_step(DeviceHalf(d_part, trainer.wire, cfg.compute_dtype),
                               None if d_part.is_full else ServerHalf(s_part, trainer.wire, cfg.compute_dtype),
                               batch["input_ids"], batch["labels"], am,
                               device_optimizer=trainer.device.opt, server_optimizer=trainer.server.opt)
            local[m] = trainer.device.export(d_own)
            server[m] = _merge(server[m], trainer.server.export(s_own))
            if mode == "splitfed":
                server = [server[m]] * M
            log = StepLog(trainer.global_step, n, m, cuts[m], r.loss, r.bytes_up, r.bytes_down,
                          r.smashed.smashed_bytes if r.smashed is not None else 0,
                          handover[m] if i == 0 else 0, r.device_time_s, r.server_time_s)
            trainer.logs.append(log)
            trainer.global_step += 1
        done = [m for m in range(M) if (n, m) not in (lost or {})]  # the participants of the average
        models = [_merge(_subset(server[m], cut_parts(cuts[m])[3]), local[m]) for m in done]
        base = server[0] if mode == "splitfed" else glob  # matrices no participant holds
        _load_global(trainer, _merge(base, fedavg_payloads(models, [sample_weights[m] for m in done])), cuts[0])
        if checkpoint_path is not None:
            trainer.save_checkpoint(checkpoint_path)
    return trainer.logs

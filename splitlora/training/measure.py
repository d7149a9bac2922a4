"""Host measurement of split LoRA training per cut layer: the measured profile the delay model predicts.

:func:`measure_split_profile` times real split training steps on this host and counts each part's memory and the
smashed bytes; :func:`predicted_vs_measured` (and :func:`measure_and_predict`) compare them with the profile's
prediction. Source: docs/split-training.md, "Measured profile" (the columns).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from splitlora._validate import check_choice, check_int_range, check_positive
from splitlora.errors import InvalidParameterError
from splitlora.model.profile import ATTN_TARGETS, profile_model, wire_bytes_of
from splitlora.training.models import llama32_1b_config, model_from_config
from splitlora.training.split import (GRANULARITIES, WIRE_DTYPES, num_units, shared_weight_copy, split_model,
                                      tensor_bytes, wire_dtype_of)
from splitlora.training.step import DeviceHalf, ServerHalf

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _SavedTensorCounter:
    """Context manager: bytes of the unique non-parameter storages autograd saves for backward."""
    def __init__(self, exclude_ptrs: set[int]):
        self.exclude, self.seen, self.nbytes = exclude_ptrs, set(), 0

    def _pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.nbytes += st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _param_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(all parameter bytes, trainable parameter bytes) of a module (unique parameters)."""
    ps = list(module.parameters())
    return sum(tensor_bytes(p) for p in ps), sum(tensor_bytes(p) for p in ps if p.requires_grad)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def measure_cut(model, cut_layer: int, input_ids: torch.Tensor, labels: torch.Tensor, *,
                granularity: str = "block", wire_dtype: str = "float32", repeats: int = 3,
                warmup: int = 1, clock: str = "wall") -> dict:
    """One row of :func:`measure_split_profile` for a LoRA-wrapped ``model`` at ``cut_layer``.

    ``input_ids``/``labels``: (B, s) long. Returns a dict of the columns documented in docs/split-training.md,
    "Measured profile". ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: CPU seconds of
    this process, which other processes on a shared host do not inflate; meant with one torch thread, since
    idle worker threads spinning would be counted). Raises ValueError for a bad cut, granularity, wire dtype
    or clock.
    """
    check_choice("clock", clock, CLOCKS)
    now = CLOCKS[clock]
    check_int_range("repeats", repeats, 1, 10**6)
    check_int_range("warmup", warmup, 0, 10**6)
    wire = wire_dtype_of(wire_dtype)
    dev, srv = split_model(model, cut_layer, granularity)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ptrs |= {p.untyped_storage().data_ptr() for p in srv.parameters()}
    t = {k: [] for k in ("df", "db", "sf", "sb")}
    act_d = act_s = smashed = 0
    for i in range(warmup + repeats):
        keep = i >= warmup
        half = DeviceHalf(dev, wire)
        t0 = now()
        with _SavedTensorCounter(param_ptrs) as cd:
            msg = half.forward(input_ids, labels)
        t1 = now()
        if msg is None:
            half.backward()
            t2 = now()
            if keep:
                t["df"].append(t1 - t0), t["db"].append(t2 - t1)
            act_d = cd.nbytes
        else:
            server = ServerHalf(srv, wire)
            smashed = msg.smashed_bytes
            t2 = now()
            with _SavedTensorCounter(param_ptrs) as cs:
                server.forward(msg, half.needs_gradient)
            t3 = now()
            grad = server.backward()
            t4 = now()
            half.backward(grad)
            t5 = now()
            if keep:
                t["df"].append(t1 - t0), t["sf"].append(t3 - t2), t["sb"].append(t4 - t3), t["db"].append(t5 - t4)
            act_d, act_s = cd.nbytes, cs.nbytes
        model.zero_grad(set_to_none=True)
    pd_all, pd_lora = _param_bytes(dev)
    ps_all, ps_lora = _param_bytes(srv)
    cut_io = 2 * smashed if not dev.is_full else 0
    n = num_units(model, granularity)
    row = dict(cut_layer=int(cut_layer), num_units=n, granularity=granularity, wire_dtype=wire_dtype,
               batch_size=int(input_ids.shape[0]), seq_len=int(input_ids.shape[1]),
               device_fwd_s=_median(t["df"]), device_bwd_s=_median(t["db"]),
               server_fwd_s=_median(t["sf"]), server_bwd_s=_median(t["sb"]),
               smashed_bytes=int(smashed),
               device_param_bytes=pd_all, device_lora_bytes=pd_lora, device_activation_bytes=act_d,
               server_param_bytes=ps_all, server_lora_bytes=ps_lora, server_activation_bytes=act_s)
    row["device_time_s"] = row["device_fwd_s"] + row["device_bwd_s"]
    row["server_time_s"] = row["server_fwd_s"] + row["server_bwd_s"]
    row["device_mem_bytes"] = pd_all + 3 * pd_lora + act_d + cut_io
    row["server_mem_bytes"] = (ps_all + 3 * ps_lora + act_s + cut_io) if not dev.is_full else 0
    return row


def measure_split_profile(config=None, *, cuts=None, granularity: str = "block", batch_size: int = 1,
                          seq_len: int = 32, num_layers: int | None = None, lora_rank: int = 8,
                          lora_alpha: int = 16, lora_targets=ATTN_TARGETS, wire_dtype: str = "float32",
                          repeats: int = 3, warmup: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
                          model=None, progress: bool = False, warmup_each_cut: bool = True, clock: str = "wall",
                          threads: int | None = None):
    """Measured device/server time, memory and smashed bytes per cut layer, as a pandas DataFrame.

    Args:
        config: a transformers config; default ``llama32_1b_config(num_layers)`` (Llama-3.2-1B, 16 blocks).
        cuts: cut layers to measure (default all 0..L).
        granularity: ``"block"`` or ``"sublayer"``. batch_size, seq_len: the mini-batch (B, s).
        lora_rank, lora_alpha, lora_targets: the LoRA adapter (peft ``LoraConfig``, dropout 0).
        wire_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``. repeats, warmup: timed / untimed steps
            per cut; with ``warmup_each_cut=False`` the untimed steps run before the first cut only (the
            kernels and the allocator are warm after that; saves time on a large model).
        model: an existing ``*ForCausalLM`` (overrides ``config``; not modified: LoRA goes on a copy that aliases
            its weights).
        clock: ``"wall"`` or ``"cpu"`` (:func:`measure_cut`); threads: torch intra-op threads during the
            measurement (restored after; default: leave as is). On a shared host use ``clock="cpu", threads=1``.
    Returns one row per cut (columns: docs/split-training.md, "Measured profile"). Runtime grows with L x repeats;
    the full 1B model takes seconds per step on a CPU.
    """
    from peft import LoraConfig, get_peft_model


    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("wire_dtype", wire_dtype, WIRE_DTYPES)
    check_int_range("batch_size", batch_size, 1, 10**6)
    check_int_range("seq_len", seq_len, 1, 10**6)
    if model is None:
        config = config if config is not None else llama32_1b_config(num_layers)
        model = model_from_config(config, seed=seed, dtype=dtype)
    else:
        model = shared_weight_copy(model)
    model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                             target_modules=list(lora_targets)))
    model.train()
    n = num_units(model, granularity)
    cuts = list(range(n + 1)) if cuts is None else [int(c) for c in cuts]
    g = torch.Generator().manual_seed(seed)
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    check_choice("clock", clock, CLOCKS)
    before = torch.get_num_threads()
    if threads is not None:
        check_int_range("threads", threads, 1, 4096)
        torch.set_num_threads(threads)
    try:
        rows = [measure_cut(model, c, ids, ids.clone(), granularity=granularity, wire_dtype=wire_dtype,
                            repeats=repeats, warmup=warmup if (i == 0 or warmup_each_cut) else 0, clock=clock)
                for i, c in enumerate(tqdm(cuts, disable=not progress, desc="cuts"))]
    finally:
        torch.set_num_threads(before)
    df = pd.DataFrame(rows)
    df["clock"], df["threads"] = clock, threads if threads is not None else before
    return df


# ----------------------------------------------------------------------------------------------- prediction
def host_matmul_flops_per_s(n: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Sustained FLOP/s of this host on an ``n x n`` matmul (2 n^3 FLOP), median of ``repeats`` runs after
    one warm-up, with torch's current thread count. An alternative, model-free calibration of
    :func:`predicted_vs_measured` (it ignores everything but matmuls, so it over-predicts speed)."""
    check_int_range("n", n, 1, 10**5)
    check_int_range("repeats", repeats, 1, 10**4)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / _median(ts)


def predicted_vs_measured(measured, profile, *, host_flops_per_s: float | None = None):
    """The delay model's compute times against the measured ones, per cut layer, as a pandas DataFrame.

    Args:
        measured: the table of :func:`measure_split_profile` (one row per cut, one architecture, B, s).
        profile: :func:`splitlora.model.profile.profile_model` of the same architecture, granularity, B, s, LoRA
            rank and targets, with ``param_bytes = activation_bytes`` = bytes of the measured model's dtype
            and ``wire_bytes`` = bytes of the measured wire dtype (see :func:`measure_and_predict`).
        host_flops_per_s: the host's sustained compute P (FLOP/s). Default: calibrated once from the unsplit
            step, P = F_d(L) / measured device time at c = L (the whole model on the device), so the row c = L
            measures nothing but the calibration (its total error is 0 by construction).

    Method (docs/split-training.md, "Measured profile"): on this host the device and the server are the
    same processor, so one P stands for both P_d and eta_s g_s f of the delay model. Per mini-batch the
    model predicts T_d(c) = F_d(c) / P and T_s(c) = F_s(c) / P (forward + backward FLOPs of the profile);
    the link term is not measured here (there is no link). Errors are (predicted - measured) / measured:
    ``device_time_rel_err``, ``server_time_rel_err`` (NaN where the measured time is 0, i.e. the idle
    server at c = L), ``total_time_rel_err`` on T_d + T_s. Device time at c = 0 is the embedding lookup,
    which the profile counts as 0 FLOP, so its error is -1 there. Memory: the measured device memory
    *without* the cut tensors (``device_mem_bytes`` minus the smashed tensor and its gradient, which
    the profile does not count) against ``profile.device_memory_bytes`` (frozen weights + 16 B per LoRA
    parameter + saved activations). Smashed bytes: measured against ``profile.smashed_bytes`` (must be equal).

    Returns one row per measured cut: cut_layer, measured and predicted device/server/total times (s), their
    relative errors, device FLOPs and server FLOPs (FLOP), host_flops_per_s, device memory measured and
    predicted (byte) and its relative error, smashed bytes measured and predicted (byte).
    Raises ValueError when the table and the profile disagree on L, granularity, B or s, or when the
    calibration row c = L is missing and no ``host_flops_per_s`` is given.
    """
    df = measured.sort_values("cut_layer").reset_index(drop=True)
    L = int(profile.n_cuts)
    for col, want in (("num_units", L), ("granularity", profile.granularity), ("batch_size", profile.batch_size),
                      ("seq_len", profile.seq_len)):
        got = set(df[col])
        if got != {want}:
            raise InvalidParameterError(f"measured {col}={sorted(got)!r} is invalid: must be {want!r} as in the profile")
    c = df["cut_layer"].to_numpy()
    f_dev = (profile.device_fwd_flops + profile.device_bwd_flops)[c]
    f_srv = (profile.server_fwd_flops + profile.server_bwd_flops)[c]
    if host_flops_per_s is None:
        if L not in set(c):
            raise InvalidParameterError(f"cuts={sorted(set(c))!r} is invalid: must include c = L = {L} (the unsplit step "
                             "calibrates the host FLOP/s) unless host_flops_per_s is given")
        host_flops_per_s = float(f_dev[c == L][0] / df.loc[c == L, "device_time_s"].iloc[0])
        calibration = "unsplit step (c = L)"
    else:
        check_positive("host_flops_per_s", host_flops_per_s)
        calibration = "given"
    P = float(host_flops_per_s)

    def rel(pred, meas):
        meas = np.asarray(meas, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(meas > 0, (np.asarray(pred, dtype=float) - meas) / meas, np.nan)

    mem_meas = df["device_mem_bytes"].to_numpy() - np.where(c < L, 2 * df["smashed_bytes"].to_numpy(), 0)
    mem_pred = np.asarray(profile.device_memory_bytes, dtype=float)[c]
    out = pd.DataFrame({
        "cut_layer": c, "granularity": profile.granularity, "batch_size": profile.batch_size,
        "seq_len": profile.seq_len,
        "device_time_s": df["device_time_s"], "device_time_pred_s": f_dev / P,
        "server_time_s": df["server_time_s"], "server_time_pred_s": f_srv / P,
        "total_time_s": df["device_time_s"] + df["server_time_s"], "total_time_pred_s": (f_dev + f_srv) / P,
        "device_flops": f_dev, "server_flops": f_srv, "host_flops_per_s": P, "calibration": calibration,
        "device_mem_bytes": mem_meas, "device_mem_pred_bytes": mem_pred,
        "smashed_bytes": df["smashed_bytes"], "smashed_pred_bytes": np.asarray(profile.smashed_bytes)[c],
    })
    for col in ("clock", "threads"):
        if col in df:
            out[col] = df[col]
    out["device_time_rel_err"] = rel(out["device_time_pred_s"], out["device_time_s"])
    out["server_time_rel_err"] = rel(out["server_time_pred_s"], out["server_time_s"])
    out["total_time_rel_err"] = rel(out["total_time_pred_s"], out["total_time_s"])
    out["device_mem_rel_err"] = rel(mem_pred, mem_meas)
    return out


def measure_and_predict(config=None, *, num_layers: int | None = None, granularity: str = "block",
                        batch_size: int = 1, seq_len: int = 32, lora_rank: int = 8, lora_alpha: int = 16,
                        lora_targets=ATTN_TARGETS, wire_dtype: str = "float32", repeats: int = 3,
                        warmup: int = 1, warmup_each_cut: bool = True, clock: str = "wall",
                        threads: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                        host_flops_per_s: float | None = None, progress: bool = False, model=None, cuts=None):
    """:func:`measure_split_profile` at every cut (or ``cuts``), then :func:`predicted_vs_measured` against the
    profile of the same architecture, B, s, LoRA and dtypes. ``config`` default: the Llama-3.2-1B architecture
    (random weights), ``num_layers`` blocks of it; ``model``: a loaded ``*ForCausalLM`` instead (e.g. the real
    SmolLM2-135M; not modified). Returns the prediction table (one row per cut)."""
    if model is not None:
        config = model.config
    config = config if config is not None else llama32_1b_config(num_layers)
    measured = measure_split_profile(config, model=model, cuts=cuts, granularity=granularity,
                                     batch_size=batch_size, seq_len=seq_len,
                                     lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                                     wire_dtype=wire_dtype, repeats=repeats, warmup=warmup, seed=seed,
                                     dtype=dtype, progress=progress, warmup_each_cut=warmup_each_cut,
                                     clock=clock, threads=threads)
    elem = torch.empty((), dtype=dtype).element_size()
    prof = profile_model(config, batch_size=batch_size, seq_len=seq_len, granularity=granularity,
                         lora_rank=lora_rank, lora_targets=tuple(lora_targets), param_bytes=elem,
                         activation_bytes=elem, wire_bytes=wire_bytes_of(wire_dtype))
    return predicted_vs_measured(measured, prof, host_flops_per_s=host_flops_per_s)

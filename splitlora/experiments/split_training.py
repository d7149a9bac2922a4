"""Split against unsplit training and bytes per step: the split-training experiments of the notebooks.

Source: docs/split-training.md, "Split training".
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import pandas as pd

from splitlora._validate import check_int_range
from splitlora.errors import InvalidParameterError
from splitlora.model.profile import ATTN_TARGETS, profile_model, wire_bytes_of
from splitlora.training.data import load_gsm8k, tokenize_batches
from splitlora.training.models import load_model_and_tokenizer
from splitlora.training.split import WIRE_DTYPES, num_units
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer, logs_frame, unsplit_training


def _experiment_inputs(model_name_or_path, data_path, n_batches, batch_size, seq_len, seed, tiny_kwargs):
    model, tok = load_model_and_tokenizer(model_name_or_path, seed=seed, **(tiny_kwargs or {}))
    ds = load_gsm8k(data_path, limit=n_batches * batch_size, seed=seed)
    batches = tokenize_batches(ds, tok, batch_size, seq_len, loss_on="all")
    if len(batches) < n_batches:
        raise InvalidParameterError(f"data_path={data_path!r} is invalid: holds {len(batches)} mini-batches of {batch_size}, "
                         f"must hold {n_batches}")
    return model, batches


def _lora(r: int, alpha: int, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))


def compare_split_unsplit(model_name_or_path: str | None = None, data_path: str | os.PathLike | None = None, *,
                          cuts: Sequence[int] | None = None, steps: int = 40, num_devices: int = 2,
                          batch_size: int = 4, seq_len: int = 128, lora_rank: int = 8, lora_alpha: int = 16,
                          lora_targets: Sequence[str] = ATTN_TARGETS,
                          lr: float = 3e-3, granularity: str = "block", wire_dtype: str = "float32", seed: int = 0,
                          tiny_kwargs: Mapping | None = None, progress: bool = False):
    """Split against unsplit LoRA training on GSM8K-format data, as a tidy pandas DataFrame.

    The model is :func:`splitlora.training.models.load_model_and_tokenizer` of ``model_name_or_path`` (None: the offline
    tiny Llama, ``tiny_kwargs`` for its sizes); the data :func:`splitlora.training.data.load_gsm8k` of ``data_path``
    (None: the offline synthetic default; or a GSM8K JSONL file / folder), ``steps`` mini-batches of
    ``batch_size`` x ``seq_len`` tokens. For each cut layer in ``cuts`` (default 0, L/2, L) split training
    (:class:`SplitTrainer`, ``num_devices`` devices taking turns, mini-batch k on device k mod M, so the data
    order is the same) runs against ordinary peft training of the unsplit model (:func:`unsplit_training`),
    same seed and AdamW settings (``lr``, defaults otherwise), fp32 weights.

    Returns one row per (cut_layer, step): step, round, device, cut_layer, loss_split, loss_unsplit,
    loss_abs_diff, bytes_up, bytes_down, smashed_bytes, handover_bytes (byte), and adapter_max_abs_diff
    (largest difference of any LoRA weight after the last step, the same in every row of a cut).
    With ``wire_dtype="float32"`` the two agree to float rounding (docs/split-training.md, "Split training").
    """
    check_int_range("steps", steps, 1, 10**6)
    check_int_range("num_devices", num_devices, 1, steps)
    model, batches = _experiment_inputs(model_name_or_path, data_path, steps, batch_size, seq_len, seed,
                                        tiny_kwargs)
    L = num_units(model, granularity)
    cuts = [0, L // 2, L] if cuts is None else [int(c) for c in cuts]
    for c in cuts:
        check_int_range("cut_layer", c, 0, L)
    lora = _lora(lora_rank, lora_alpha, lora_targets)
    cfg = SplitTrainConfig(lr=lr, granularity=granularity, wire_dtype=wire_dtype, seed=seed, progress=progress)
    ref, ref_losses = unsplit_training(model, lora, batches, cfg)
    want = {n: p.detach() for n, p in ref.named_parameters() if p.requires_grad}
    frames = []
    for c in cuts:
        trainer = SplitTrainer(model, lora, cfg)
        rounds = -(-steps // num_devices)
        per_device = [batches[m::num_devices] for m in range(num_devices)]
        logs = trainer.run(per_device, lambda n, m: c, rounds=rounds, stop_after=steps)
        got = trainer.adapter_state()
        df = logs_frame(logs).rename(columns={"loss": "loss_split"})
        df["loss_unsplit"] = ref_losses
        df["loss_abs_diff"] = (df["loss_split"] - df["loss_unsplit"]).abs()
        df["adapter_max_abs_diff"] = max((got[n] - want[n]).abs().max().item() for n in want)
        frames.append(df)

    out = pd.concat(frames, ignore_index=True)
    return out[["step", "round", "device", "cut_layer", "loss_split", "loss_unsplit", "loss_abs_diff",
                "adapter_max_abs_diff", "bytes_up", "bytes_down", "smashed_bytes", "handover_bytes"]]


def bytes_per_step(model_name_or_path: str | None = None, data_path: str | os.PathLike | None = None, *,
                   cuts: Sequence[int] | None = None, wire_dtypes: Sequence[str] = tuple(WIRE_DTYPES),
                   batch_size: int = 4, seq_len: int = 128, lora_rank: int = 8,
                   lora_targets: Sequence[str] = ATTN_TARGETS,
                   granularity: str = "block", seed: int = 0, tiny_kwargs: Mapping | None = None):
    """Bytes on the link per training step against cut layer and wire dtype, counted by :class:`SplitTrainer`
    (one real step per cut and dtype) next to the profile's prediction, as a tidy pandas DataFrame.

    Model and data as in :func:`compare_split_unsplit`; ``cuts`` default: every cut 0..L. Returns one row per
    (wire_dtype, cut_layer): bytes_up (smashed data + int64 labels), bytes_down (gradient; 0 at c = 0 without
    device-side LoRA, and at c = L), smashed_bytes, label_bytes, and the profile's smashed_pred_bytes,
    grad_pred_bytes (:func:`splitlora.model.profile.profile_model` with that wire dtype). Unit: byte.
    """

    model, batches = _experiment_inputs(model_name_or_path, data_path, 1, batch_size, seq_len, seed, tiny_kwargs)
    batch = batches[0]
    B, s = batch["input_ids"].shape
    L = num_units(model, granularity)
    cuts = list(range(L + 1)) if cuts is None else [int(c) for c in cuts]
    lora = _lora(lora_rank, 2 * lora_rank, lora_targets)
    rows = []
    for wd in wire_dtypes:
        elem = wire_bytes_of(wd)
        prof = profile_model(model.config, batch_size=B, seq_len=s, granularity=granularity, lora_rank=lora_rank,
                             lora_targets=tuple(lora_targets), wire_bytes=elem)
        trainer = SplitTrainer(model, lora, SplitTrainConfig(granularity=granularity, wire_dtype=wd, seed=seed))
        for c in cuts:
            log = trainer.step(batch, cut_layer=c)
            rows.append(dict(wire_dtype=wd, wire_bytes_per_element=elem, cut_layer=c, batch_size=B, seq_len=s,
                             bytes_up=log.bytes_up, bytes_down=log.bytes_down, smashed_bytes=log.smashed_bytes,
                             label_bytes=log.bytes_up - log.smashed_bytes,
                             smashed_pred_bytes=float(prof.smashed_bytes[c]),
                             grad_pred_bytes=float(prof.grad_bytes[c])))
    return pd.DataFrame(rows)

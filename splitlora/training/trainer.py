"""Sequential split LoRA fine-tuning: one server, several devices taking turns (:class:`SplitTrainer`).

A step runs the device forward, the wire, the server forward, loss and backward, and the device backward; between
devices the device-side adapter and its AdamW state are handed over, so split training is the same computation
as ordinary peft training of the unsplit model. Source: docs/split-training.md, "Split training".
"""
from __future__ import annotations

import copy
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from splitlora._validate import check_choice, check_int_range, check_positive
from splitlora.atomic import atomic_save_folder, atomic_write, load_checkpoint_file
from splitlora.errors import InvalidParameterError
from splitlora.training.evaluation import SplitLM
from splitlora.training.federated import MODES, run_parallel
from splitlora.training.node import LoraNode, payload_bytes, roundtrip, trainable_names
from splitlora.training.split import (COMPUTE_DTYPES, GRANULARITIES, WIRE_DTYPES, compute_context, num_targets,
                                      num_units, shared_weight_copy, split_model, wire_dtype_of)
from splitlora.training.step import DeviceHalf, ServerHalf, split_step

ADAPTER_NAME = "default"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class SplitTrainConfig:
    """Settings of split training (defaults in brackets).

    lr: AdamW learning rate [1e-3]. betas, eps, weight_decay: as torch.optim.AdamW [(0.9, 0.999), 1e-8, 0.01].
    granularity: cut points are ``"block"`` or ``"sublayer"`` units ["block"].
    wire_dtype: dtype of smashed data and its gradient on the link: ``"float32"``, ``"bfloat16"``,
    ``"float16"`` ["float32"]. seed: seeds the LoRA initialisation (and dropout RNG) [0].
    send_attention_mask: send the batch's 2-D padding mask (B, s) with the smashed data and use it on
    both sides; with right padding and a causal model it does not change the loss [False].
    progress: show a tqdm bar [False].
    compute_dtype: precision of forward and backward on both sides: ``"float32"``, or ``"bfloat16"`` mixed
    precision (``torch.autocast``; weights, LoRA, AdamW state and the hidden state at the cut stay fp32, so the
    wire dtype still decides what is lost on the link). About 4x faster on a CPU with AVX512-BF16 ["float32"].
    """
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    granularity: str = "block"
    wire_dtype: str = "float32"
    seed: int = 0
    send_attention_mask: bool = False
    progress: bool = False
    compute_dtype: str = "float32"

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_positive("eps", self.eps)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        b = self.betas
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and 0 <= x < 1 for x in b)):
            raise InvalidParameterError(f"betas={b!r} is invalid: must be two numbers in [0, 1) (AdamW)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise InvalidParameterError(f"seed={self.seed!r} is invalid: must be an integer >= 0")
        for k in ("send_attention_mask", "progress"):
            if not isinstance(getattr(self, k), bool):
                raise InvalidParameterError(f"{k}={getattr(self, k)!r} is invalid: must be a boolean (true or false)")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("wire_dtype", self.wire_dtype, WIRE_DTYPES)
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)


@dataclass
class StepLog:
    """One mini-batch. Bytes in byte, times in second (wall clock of this host).

    bytes_up: device -> server (smashed data + labels (+ mask)); bytes_down: server -> device (gradient);
    handover_bytes: adapter + optimiser state moved before this step (device -> device, server <-> device).
    """
    step: int
    round: int
    device: int
    cut_layer: int
    loss: float
    bytes_up: int
    bytes_down: int
    smashed_bytes: int
    handover_bytes: int = 0
    device_time_s: float = 0.0
    server_time_s: float = 0.0



CutSchedule = Sequence[Sequence[int]] | Callable[[int, int], int]


def check_has_targets(labels: torch.Tensor) -> None:
    """Refuse a mini-batch whose labels (B, s) hold no target token after the causal shift (all -100): its loss
    is 0 / 0 = NaN and one such step would turn every LoRA weight into NaN. Raises ValueError."""
    if num_targets(labels) == 0:
        raise InvalidParameterError("batch labels are invalid: every target is -100 (no answer token left after truncation?); "
                         "raise seq_len or use loss_on='all'")


def _check_lora_config(lora_config) -> None:
    """Refuse, before any step, peft options whose adapter split training cannot export: ``modules_to_save`` and
    DoRA (``use_dora``: its magnitude vectors have no key in the adapter format this trainer writes)."""
    if getattr(lora_config, "modules_to_save", None):
        raise InvalidParameterError(f"lora_config.modules_to_save={lora_config.modules_to_save!r} is invalid: "
                         "must be None (split training adapts LoRA parameters only)")
    if getattr(lora_config, "use_dora", False):
        raise InvalidParameterError("lora_config.use_dora=True is invalid: must be False (DoRA magnitude vectors are not "
                         "exported by split training)")
    if getattr(lora_config, "bias", "none") != "none":
        raise InvalidParameterError(f"lora_config.bias={lora_config.bias!r} is invalid: must be 'none' (trained biases are "
                         "the base model's own tensors)")
    if getattr(lora_config, "trainable_token_indices", None):
        raise InvalidParameterError(f"lora_config.trainable_token_indices={lora_config.trainable_token_indices!r} is invalid: "
                         "must be None (split training adapts LoRA parameters only)")
    init = getattr(lora_config, "init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise InvalidParameterError(f"lora_config.init_lora_weights={init!r} is invalid: must be True, False or "
                                    "'gaussian' (data- or SVD-based initialisations rewrite the base weights the two "
                                    "sides share)")
    # every other option must keep its default: each changes the model (layer_replication, target_parameters,
    # lora_bias, quantisation-aware variants, activated LoRA, ...) in ways the export or the split does not carry
    from peft import LoraConfig

    default = LoraConfig()
    for k in _LORA_OPTIONS_AT_DEFAULT:
        v = getattr(lora_config, k, None)
        if v != getattr(default, k, None):
            raise InvalidParameterError(f"lora_config.{k}={v!r} is invalid: must be {getattr(default, k, None)!r} "
                                        "(split training does not support this peft option)")


# peft LoraConfig options split training refuses unless they keep their default (those it supports: r, lora_alpha,
# lora_dropout, target_modules, exclude_modules, fan_in_fan_out, use_rslora, init_lora_weights True/False/"gaussian",
# layers_to_transform, layers_pattern, rank_pattern, alpha_pattern; tests/training/test_trainer_options.py)
_LORA_OPTIONS_AT_DEFAULT = ("layer_replication", "target_parameters", "lora_bias", "use_qalora", "loftq_config",
                            "eva_config", "corda_config", "lora_ga_config", "velora_config", "alora_invocation_tokens",
                            "monteclora_config", "megatron_config", "use_bdlora", "arrow_config", "kasa_config")


def _check_trainable_not_shared(peft_model, base) -> None:
    """The trainable tensors of ``peft_model`` must be its own, never storage of ``base`` (whose frozen weights it
    aliases): otherwise a NaN wipe or an optimiser step would write into the user's model. Raises RuntimeError."""
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    shared = [n for n, p in peft_model.named_parameters() if p.requires_grad and p.data_ptr() in base_ptrs]
    if shared:
        raise RuntimeError(f"trainable parameters {shared[:3]} alias the base model's weights; refusing to train")


class SplitTrainer:
    """Sequential split LoRA training of a causal LM between one server and devices taking turns.

    Args:
        model: base ``*ForCausalLM`` (Llama / Qwen2 / Mistral); never modified. Its weights are not copied: the
            server and device instances alias them (:func:`splitlora.training.split.shared_weight_copy`), each with its own
            LoRA parameters, so building a trainer adds only the LoRA tensors to memory.
        lora_config: one ``peft.LoraConfig`` used for both sides (LoRA is initialised under
            ``torch.manual_seed(config.seed)`` with ``peft.get_peft_model``, as ordinary peft training would).
        config: :class:`SplitTrainConfig`.

    Raises ValueError for an unsupported architecture, LoRA on a tied embedding/head, or
    ``modules_to_save`` (not supported). Source: docs/split-training.md, "Split training".
    """
    def __init__(self, model: nn.Module, lora_config, config: SplitTrainConfig = SplitTrainConfig()):
        from peft import get_peft_model

        self.config = config
        self.wire = wire_dtype_of(config.wire_dtype)
        torch.manual_seed(config.seed)
        _check_lora_config(lora_config)
        server_model = get_peft_model(shared_weight_copy(model), copy.deepcopy(lora_config))
        _check_trainable_not_shared(server_model, model)
        split_model(server_model, 0, config.granularity)  # architecture / tied-LoRA checks
        server_model.train()
        device_model = shared_weight_copy(server_model, share_trainable=False)
        self.num_units = num_units(server_model, config.granularity)
        self.server, self.device = LoraNode(server_model, config), LoraNode(device_model, config)
        self.server.set_owned(list(self.server.params))  # the server starts with the initial adapter
        self.device.wipe()
        self.cut: int | None = None
        self._moved_outside_steps = 0  # LoRA bytes moved by a re-split for evaluation, logged with the next step
        self.device_id: int | None = None
        self.global_step = 0
        self.logs: list[StepLog] = []

    # ------------------------------------------------------------------ ownership
    def _set_cut(self, cut: int) -> int:
        """Re-split both instances at ``cut``; move LoRA parameters across. Returns bytes moved."""
        d_part, _ = split_model(self.device.model, cut, self.config.granularity)
        _, s_part = split_model(self.server.model, cut, self.config.granularity)
        d_own, s_own = trainable_names(self.device, d_part), trainable_names(self.server, s_part)
        to_dev = [n for n in d_own if n not in self.device.owned]
        to_srv = [n for n in s_own if n not in self.server.owned]
        pay_d = roundtrip(self.server.export(to_dev)) if to_dev else None
        pay_s = roundtrip(self.device.export(to_srv)) if to_srv else None
        moved = (payload_bytes(pay_d) if pay_d else 0) + (payload_bytes(pay_s) if pay_s else 0)
        self.device.set_owned(d_own, pay_d)
        self.server.set_owned(s_own, pay_s)
        self.device.part, self.server.part, self.cut = d_part, s_part, cut
        return moved

    def _hand_over(self, new_device: int) -> int:
        """The device in turn hands its adapter (and optimiser state) to ``new_device``. Returns bytes."""
        payload = roundtrip(self.device.export(self.device.owned))
        owned = list(self.device.owned)
        self.device.wipe()
        self.device.set_owned(owned, payload)
        self.device_id = new_device
        return payload_bytes(payload)

    def _prepare(self, device_id: int, cut: int) -> int:
        check_int_range("cut_layer", cut, 0, self.num_units)
        moved = 0
        if self.device_id is not None and device_id != self.device_id:
            moved += self._hand_over(device_id)
        self.device_id = device_id
        if cut != self.cut:
            moved += self._set_cut(int(cut))
        moved, self._moved_outside_steps = moved + self._moved_outside_steps, 0
        return moved

    def _current_cut(self) -> int:
        """The cut a step or an evaluation uses when none is given: the current one, else L/2."""
        return self.cut if self.cut is not None else self.num_units // 2

    def split_lm(self, cut_layer: int | None = None, compute_dtype: str | None = None):
        """The split model as one language model for evaluation (:class:`splitlora.training.evaluation.SplitLM`): the
        device in turn's part and the server's part at ``cut_layer`` (default: the current cut, else L/2),
        smashed data cast to the wire dtype, ``compute_dtype`` (default: the trainer's). A new cut moves the LoRA
        tensors between the sides as a training step would (their bytes are logged with the next step)."""
        if cut_layer is None:
            cut_layer = self._current_cut()
        check_int_range("cut_layer", cut_layer, 0, self.num_units)
        if cut_layer != self.cut:
            self._moved_outside_steps += self._set_cut(int(cut_layer))
        return SplitLM(self.device.part, self.server.part, self.config.wire_dtype,
                       compute_dtype or self.config.compute_dtype, modules=[self.device.model, self.server.model])

    # ------------------------------------------------------------------ one step
    def step(self, batch: Mapping[str, torch.Tensor], device_id: int = 0, cut_layer: int | None = None,
             round_index: int = 0) -> StepLog:
        """Train on one mini-batch ``{"input_ids": (B, s) long, "labels": (B, s) long (-100 ignored),
        optional "attention_mask": (B, s)}`` on device ``device_id`` with ``cut_layer`` (default: the
        current cut, else L/2 rounded down). Returns the :class:`StepLog` (also appended to ``logs``)."""
        if cut_layer is None:
            cut_layer = self._current_cut()
        ids, labels = batch["input_ids"], batch["labels"]
        check_has_targets(labels)
        moved = self._prepare(device_id, cut_layer)
        am = batch.get("attention_mask") if self.config.send_attention_mask else None
        dev, srv = self.device.part, self.server.part
        r = split_step(DeviceHalf(dev, self.wire, self.config.compute_dtype),
                       None if dev.is_full else ServerHalf(srv, self.wire, self.config.compute_dtype),
                       ids, labels, am, device_optimizer=self.device.opt, server_optimizer=self.server.opt)
        up, down, smashed = r.bytes_up, r.bytes_down, (r.smashed.smashed_bytes if r.smashed is not None else 0)
        loss, t_dev, t_srv = r.loss, r.device_time_s, r.server_time_s
        log = StepLog(self.global_step, round_index, device_id, int(cut_layer), loss, up, down,
                      smashed, moved, t_dev, t_srv)
        self.logs.append(log)
        self.global_step += 1
        return log

    # ------------------------------------------------------------------ many steps
    def run(self, device_batches: Sequence[Sequence[Mapping[str, torch.Tensor]]], cut_layers: CutSchedule,
            rounds: int, steps_per_round: int | Sequence[int] = 1, *, checkpoint_path: str | os.PathLike | None = None,
            checkpoint_every: int | None = None, stop_after: int | None = None, mode: str = "sequential",
            sample_weights: Sequence[float] | None = None, lost: Mapping | None = None) -> list[StepLog]:
        """Train ``rounds`` rounds; in round n devices m = 0..M-1 take turns, each for ``steps_per_round``
        mini-batches ``device_batches[m][(n * steps_per_round + i) % len(device_batches[m])]`` with cut
        layer ``cut_layers[n][m]`` (or ``cut_layers(n, m)``; CARD decides it elsewhere). ``steps_per_round`` may
        also be one count per device (I_m).

        ``mode``: ``"sequential"`` (devices take turns, above), or a parallel mode of
        :func:`splitlora.training.federated.run_parallel` (``"splitfed"`` = SFL-V2, ``"splitfed_v1"``, ``"fedlora"``;
        ``sample_weights``: their FedAvg weights per device; ``lost``: devices lost mid-round, as there;
        docs/split-training.md "Training modes").

        Steps already done (``global_step``, e.g. after :meth:`load_checkpoint`) are skipped. A checkpoint
        is written every ``checkpoint_every`` steps when ``checkpoint_path`` is set (parallel modes: at each round's
        end); ``stop_after`` stops after that global step count (to emulate an interruption; parallel modes: a
        multiple of the steps of a round). Returns all logs so far. Raises InvalidParameterError before any step
        for a bad mode, count or weight.
        """
        check_choice("mode", mode, MODES)
        check_int_range("rounds", rounds, 0, 10**9)
        m_dev = len(device_batches)
        if m_dev == 0:
            raise InvalidParameterError("device_batches=[] is invalid: must hold at least one device's batches")
        steps = [steps_per_round] * m_dev if isinstance(steps_per_round, (int, np.integer)) else list(steps_per_round)
        if len(steps) != m_dev:
            raise InvalidParameterError(f"steps_per_round={steps_per_round!r} is invalid: must be one count or one "
                                        f"per device ({m_dev})")
        check_int_range("steps_per_round", steps, 1, 10**9)
        cut_of = cut_layers if callable(cut_layers) else (lambda n, m: cut_layers[n][m])
        if mode != "sequential":
            if sample_weights is not None and len(sample_weights) != m_dev:
                raise InvalidParameterError(f"sample_weights of length {len(sample_weights)} is invalid: must hold "
                                            f"one weight per device ({m_dev})")
            if sample_weights is not None:
                check_positive("sample_weights", list(sample_weights))
            if stop_after is not None and stop_after % sum(steps):
                raise InvalidParameterError(f"stop_after={stop_after} is invalid for mode={mode!r}: must be a "
                                            f"multiple of the steps of a round ({sum(steps)})")
            return run_parallel(self, device_batches, cut_of, rounds, steps, mode, sample_weights=sample_weights,
                                checkpoint_path=checkpoint_path,
                                stop_after_round=None if stop_after is None else stop_after // sum(steps), lost=lost)
        elif sample_weights is not None or lost:
            if lost:
                raise InvalidParameterError(f"lost={lost!r} is invalid for mode='sequential': must be None (only "
                                            "the parallel modes average over devices)")
            raise InvalidParameterError("sample_weights is invalid for mode='sequential': must be None (nothing is "
                                        "averaged)")
        sched = [(n, m, i) for n in range(rounds) for m in range(m_dev) for i in range(steps[m])]
        end = len(sched) if stop_after is None else min(len(sched), stop_after)
        bar = tqdm(total=end, initial=min(self.global_step, end), disable=not self.config.progress,
                   desc="split training")
        for k in range(self.global_step, end):
            n, m, i = sched[k]
            data = device_batches[m]
            log = self.step(data[(n * steps[m] + i) % len(data)], m, int(cut_of(n, m)), n)
            bar.update(1)
            bar.set_postfix(loss=f"{log.loss:.4f}", cut=log.cut_layer, dev=m)
            if checkpoint_path is not None and checkpoint_every and self.global_step % checkpoint_every == 0:
                self.save_checkpoint(checkpoint_path)
        bar.close()
        return self.logs

    # ------------------------------------------------------------------ state
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every LoRA tensor, by its PeftModel parameter name, from whichever side owns it (copies)."""
        out = {n: self.device.params[n].detach().clone() for n in self.device.owned}
        out.update({n: self.server.params[n].detach().clone() for n in self.server.owned})
        return out

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: adapters, owners, optimiser states, RNG, position, logs."""
        return {
            "version": CHECKPOINT_VERSION,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "global_step": self.global_step, "cut": self.cut, "device_id": self.device_id,
            "device_params": {n: self.device.params[n].detach().clone() for n in self.device.owned},
            "server_params": {n: self.server.params[n].detach().clone() for n in self.server.owned},
            "device_opt": self.device.opt_state(), "server_opt": self.server.opt_state(),
            "rng": torch.get_rng_state(), "logs": [asdict(x) for x in self.logs],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`. Raises ValueError if it was made with another configuration."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise InvalidParameterError(f"checkpoint version={state.get('version')!r} is invalid: must be {CHECKPOINT_VERSION}")
        mine = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        theirs = dict(state["config"])
        theirs.setdefault("compute_dtype", "float32")  # checkpoints from before the field existed
        for k in ("progress",):
            mine.pop(k), theirs.pop(k, None)
        if mine != theirs:
            raise InvalidParameterError(f"checkpoint config={theirs!r} is invalid: must equal this trainer's {mine!r}")
        self.device.wipe()
        self.server.set_owned(list(state["server_params"]),
                              {"params": state["server_params"], "opt": state["server_opt"]})
        self.device.set_owned(list(state["device_params"]),
                              {"params": state["device_params"], "opt": state["device_opt"]})
        self.cut, self.device_id = state["cut"], state["device_id"]
        if self.cut is not None:
            self.device.part, _ = split_model(self.device.model, self.cut, self.config.granularity)
            _, self.server.part = split_model(self.server.model, self.cut, self.config.granularity)
        self.global_step = int(state["global_step"])
        self.logs = [StepLog(**d) for d in state["logs"]]
        torch.set_rng_state(state["rng"])

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Write :meth:`state_dict` atomically (temporary file, then ``os.replace``). Returns the path."""
        state = self.state_dict()
        return atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (``torch.load(weights_only=True)``). Raises
        :class:`~splitlora.errors.CorruptFileError` naming the path for a truncated or corrupt file."""
        self.load_state_dict(load_checkpoint_file(path))

    # ------------------------------------------------------------------ export
    def export_adapter(self, directory: str | os.PathLike) -> Path:
        """Merge the device-side and server-side adapters into one standard PEFT adapter folder
        (``adapter_config.json`` + ``adapter_model.safetensors``) that
        ``peft.PeftModel.from_pretrained(unsplit_base_model, directory)`` loads. Returns the folder. Each file is
        written to a temporary folder and renamed into place, so an existing adapter there is replaced whole.
        Raises RuntimeError if a LoRA tensor has no key in the PEFT format (or one is missing)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file


        merged = self.adapter_state()
        expected = get_peft_model_state_dict(self.server.model, save_embedding_layers=False)
        out = {}
        for name, t in merged.items():
            key = name.replace(f".{ADAPTER_NAME}", "")
            if key not in expected:
                raise RuntimeError(f"LoRA tensor {name!r} has no key in the PEFT adapter format")
            out[key] = t.contiguous()
        missing = set(expected) - set(out)
        if missing:
            raise RuntimeError(f"adapter export is missing {sorted(missing)[:3]}...")
        def save(tmp: Path) -> None:
            save_file(out, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            self.server.model.peft_config[ADAPTER_NAME].save_pretrained(str(tmp))

        return atomic_save_folder(directory, save)


def logs_frame(logs: Sequence[StepLog]):
    """The step logs as a pandas DataFrame (one row per mini-batch, columns of :class:`StepLog`)."""
    return pd.DataFrame([asdict(x) for x in logs])


# ----------------------------------------------------------------------------------------------- experiments
def unsplit_training(model: nn.Module, lora_config, batches: Sequence[Mapping[str, torch.Tensor]],
                     config: SplitTrainConfig = SplitTrainConfig()):
    """Ordinary peft training of the unsplit model, the reference split training must equal: LoRA initialised
    under ``torch.manual_seed(config.seed)``, one AdamW (same hyper-parameters), the model's own forward and
    loss (under ``config.compute_dtype``), one step per batch in order. ``model`` is not modified (its weights
    are aliased, not copied). Returns ``(peft_model, losses)``."""
    from peft import get_peft_model

    _check_lora_config(lora_config)
    torch.manual_seed(config.seed)
    ref = get_peft_model(shared_weight_copy(model), copy.deepcopy(lora_config))
    _check_trainable_not_shared(ref, model)
    ref.train()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=config.lr, betas=config.betas,
                            eps=config.eps, weight_decay=config.weight_decay)
    losses = []
    for b in batches:
        check_has_targets(b["labels"])
        am = b.get("attention_mask") if config.send_attention_mask else None
        with compute_context(config.compute_dtype, b["input_ids"].device.type):
            out = ref(input_ids=b["input_ids"], attention_mask=am, labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return ref, losses

"""What every process of a run derives from its configuration: base model, LoRA, data, channel, cost model, cuts.

Source: docs/distributed.md.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitlora.distributed.config import SPLITFED_MODES, SYNTHETIC_GSM8K, DistConfig, RunConfig, planning_scenario
from splitlora.errors import InvalidParameterError
from splitlora.model.card import card
from splitlora.model.parallel import card_parallel
from splitlora.model.hardware import CHANNEL_STATES, load_channel, load_hardware
from splitlora.model.profile import ATTN_TARGETS, MLP_TARGETS, profile_model, wire_bytes_of
from splitlora.model.scenario import channel_states
from splitlora.model.system import CostModel, Workload
from splitlora.training.data import load_gsm8k, tokenize_batches
from splitlora.training.models import byte_tokenizer, load_model_and_tokenizer, load_tokenizer
from splitlora.training.split import num_units, wire_dtype_of
from splitlora.training.trainer import SplitTrainer


def compute_device(d: DistConfig) -> torch.device:
    """This rank's compute device for ``d.device``: cpu; ``cuda:<LOCAL_RANK mod visible GPUs>`` for "cuda" (and for
    "auto" when CUDA is available). Raises ValueError for ``device: cuda`` on a host without CUDA."""
    if d.device == "cpu" or (d.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidParameterError("dist.device='cuda' is invalid on this host: torch sees no CUDA device; must be 'cpu' or "
                         "'auto'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


RUNS_DIR = "splitlora-runs"  # the default run folders: <cwd>/splitlora-runs/<fingerprint as 16 hex digits>


def run_folders(cfg: RunConfig) -> tuple[Path, Path | None]:
    """``(output folder, checkpoint folder or None)`` of a distributed run on this host: ``dist.output_dir``, else
    the run folder ``splitlora-runs/<fingerprint>`` (relative to the working directory); ``dist.checkpoint_dir``,
    else ``<output folder>/checkpoint``; no checkpoint folder with ``dist.checkpoints: false``."""
    d = cfg.dist
    out = Path(d.output_dir) if d.output_dir else Path(RUNS_DIR) / f"{cfg.fingerprint():016x}"
    if not d.checkpoints:
        return out, None
    return out, Path(d.checkpoint_dir) if d.checkpoint_dir else out / "checkpoint"


def check_writable(folder: Path, name: str) -> None:
    """Create ``folder`` if needed and write and remove a file in it, so a folder that cannot hold results fails
    before the first training step. Raises InvalidParameterError naming the field ``name`` and the folder."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".splitlora-write-check."):
            pass
    except OSError as err:
        raise InvalidParameterError(f"{name}={str(folder)!r} is invalid: cannot write there ({err.strerror or err}); "
                                    "must be a folder this process can write") from None


def build_base_model(cfg: RunConfig):
    """The frozen base model: the offline tiny Llama (``tiny_llama_config(**model)``) or ``name_or_path`` (a named
    real model such as ``"smollm2-135m"``, a GGUF file, a folder or a Hub id: :func:`splitlora.training.models.load_model_and_tokenizer`)."""
    kw = dict(cfg.model)
    seed = int(kw.pop("seed", 0))
    name = kw.pop("name_or_path", None)
    return load_model_and_tokenizer(name, seed=seed, **({} if name else kw))[0]


def lora_config(cfg: RunConfig):
    from peft import LoraConfig

    return LoraConfig(**cfg.lora)


def build_tokenizer(cfg: RunConfig):
    """The tokenizer of the base model: the offline byte tokenizer, or ``name_or_path``'s (pad = EOS if none)."""
    name = cfg.model.get("name_or_path")
    if name is None:
        return byte_tokenizer()

    return load_tokenizer(name)


def gsm8k_batches(cfg: RunConfig, vocab_size: int, tokenizer=None) -> list[list[dict]]:
    """Mini-batches of every device from GSM8K-format records (``cfg.data``): the first M x K x B records
    (M devices, K = ``batches_per_device``, B = ``batch_size``) in file order, formatted and tokenised by
    :func:`splitlora.training.data.tokenize_batches` (right padding to s = ``seq_len``, longer records truncated,
    labels -100 on padding only: the loss is on every token); device m holds mini-batches m K .. (m + 1) K - 1. Raises ValueError when the
    source holds fewer records or a token id is not below ``vocab_size``."""
    M, K, B = cfg.num_devices, cfg.batches_per_device, cfg.batch_size
    source = None if cfg.data == SYNTHETIC_GSM8K else cfg.data
    ds = load_gsm8k(source, limit=M * K * B, seed=cfg.data_seed)
    if len(ds) < M * K * B:
        raise InvalidParameterError(f"data={cfg.data!r} is invalid: holds {len(ds)} records, must hold {M * K * B} "
                         f"({M} devices x {K} batches_per_device x {B} batch_size)")
    batches = tokenize_batches(ds, tokenizer or build_tokenizer(cfg), B, cfg.seq_len, loss_on="all")
    top = max(int(b["input_ids"].max()) for b in batches)
    if top >= vocab_size:
        raise InvalidParameterError(f"data={cfg.data!r} is invalid for this model: token id {top} >= vocab_size {vocab_size}")
    return [batches[m * K:(m + 1) * K] for m in range(M)]


def device_batches(cfg: RunConfig, vocab_size: int) -> list[list[dict]]:
    """Mini-batches of every device: {input_ids, labels, attention_mask}, each (B, s). ``cfg.data`` None: random
    tokens in 3..vocab_size-1; else GSM8K-format records (:func:`gsm8k_batches`)."""
    if cfg.data is not None:
        return gsm8k_batches(cfg, vocab_size)
    vocab = int(vocab_size)
    out = []
    for m in range(cfg.num_devices):
        g = torch.Generator().manual_seed(cfg.data_seed * 1000 + m)
        batches = []
        for _ in range(cfg.batches_per_device):
            ids = torch.randint(3, vocab, (cfg.batch_size, cfg.seq_len), generator=g)
            mask = torch.ones_like(ids)
            mask[1::2, cfg.seq_len // 2:] = 0
            ids = ids.masked_fill(mask == 0, 0)
            batches.append({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask})
        out.append(batches)
    return out


def channel_rates(cfg: RunConfig):
    """(state names (N, M), model rates (N, M) bit/s) of every device-round."""

    idx = channel_states(cfg.link.condition, cfg.rounds, cfg.num_devices, seed=cfg.link.seed)
    ch = load_channel()
    names = np.array(CHANNEL_STATES)[idx]
    return names, np.vectorize(ch.rate_bps)(names).astype(float)


def cost_model(cfg: RunConfig, hf_config):
    """(CARD's cost model, the trained model's profile): the cost model is that of this run's model and workload
    on the data/hardware.yaml server, or of ``card_scenario``."""
    targets = [t for t in cfg.lora.get("target_modules", ATTN_TARGETS) if t in ATTN_TARGETS + MLP_TARGETS]
    wire = wire_bytes_of(cfg.train.wire_dtype)
    prof = profile_model(hf_config, batch_size=cfg.batch_size, seq_len=cfg.seq_len, granularity=cfg.train.granularity,
                         lora_rank=int(cfg.lora.get("r", 8)), lora_targets=targets or ATTN_TARGETS,
                         param_bytes=4, wire_bytes=wire)
    if cfg.card_scenario is not None:
        cm = planning_scenario(cfg).cost_model()
    else:
        cm = CostModel.from_profile(prof, load_hardware(cfg.hardware).server(cfg.server), Workload(cfg.steps_per_round))
    if cfg.mode in SPLITFED_MODES and not cm.parallel:  # SFL-V2 / V1: the parallel schedule (docs/model.md)
        cm = dataclasses.replace(cm, schedule="parallel-pipelined" if cm.pipelined else "parallel")
    return cm, prof


def decide_cut(cfg: RunConfig, model, n: int, m: int, flops_per_s: float, memory_bytes: float, rate_bps: float,
               num_units: int) -> int:
    """Cut layer (0..``num_units``) of device m in round n: the schedule, or CARD from the reported profile and
    the channel rate. ``model`` is :func:`cost_model`'s CostModel. Infeasible (no cut fits): 0 (server-only)."""
    if isinstance(cfg.cut, (list, tuple)):
        return int(cfg.cut[n][m])
    if not isinstance(cfg.cut, str):
        return int(cfg.cut)
    d = card_decision(cfg, model, flops_per_s, memory_bytes, rate_bps)
    return round(max(int(d.cut_layer[0]), 0) * num_units / model.n_cuts)


def round_cuts(cfg: RunConfig, model, n: int, profiles, rates_bps, num_units: int) -> list[int]:
    """Cut layer of every device in round n of a parallel mode: ``fedlora``: L (no split, by definition);
    ``splitfed`` and ``splitfed_v1``: the schedule, or the parallel schedule's CARD
    (:func:`splitlora.model.parallel.card_parallel`, all devices of the round jointly) from the reported
    ``profiles`` [(FLOP/s, memory bytes)] and up-link ``rates_bps`` (bit/s), one per device, scaled to
    ``num_units`` as :func:`decide_cut` does (infeasible: 0)."""
    M = cfg.num_devices
    if cfg.mode == "fedlora":
        return [num_units] * M
    if cfg.cut != "card":
        return [decide_cut(cfg, model, n, m, 1.0, 1.0, 1.0, num_units) for m in range(M)]
    P, Mem = [[float(p[0]) for p in profiles]], [[float(p[1]) for p in profiles]]
    R = [[float(r) for r in rates_bps]]
    d = card_parallel(model, P, R, R, Mem, cfg.w, discrete_clocks=True)
    return [round(max(int(c), 0) * num_units / model.n_cuts) for c in d.cut_layer[0]]


def card_decision(cfg: RunConfig, model, flops_per_s: float, memory_bytes: float, rate_bps: float):
    """CARD's :class:`~splitlora.model.card.Decision` (shape (1,)) for one device-round of this run: ``model`` (the
    planning model's cost model, :func:`cost_model`), the run's ``w``, the server's clock table."""
    return card(model, [flops_per_s], [rate_bps], [rate_bps], [memory_bytes], cfg.w, discrete_clocks=True)


def device_profile(cfg: RunConfig, m: int) -> tuple[float, float]:
    """(FLOP/s, training memory bytes) device m reports: its profile in data/hardware.yaml (and ``hardware``)."""
    d = load_hardware(cfg.hardware).device(cfg.devices[m])
    return d.flops_per_s, d.training_memory_bytes


@dataclass(frozen=True)
class RunPlan:
    """Everything a run derives from its configuration, built once per process by :meth:`build` and identical in
    every process of the run (the server, each device, and :func:`run_in_process`).

    Fields: ``config`` (the :class:`RunConfig`); ``base_model`` (frozen ``*ForCausalLM``); ``lora`` (its
    ``peft.LoraConfig``); ``num_units`` (L at the configured granularity); ``hidden_size`` (H); ``wire_dtype``
    (torch dtype of smashed data and gradients); ``cost_model`` (CARD's :class:`~splitlora.model.system.CostModel`)
    and ``profile`` (the trained model's :class:`~splitlora.model.profile.ModelProfile`, bytes per cut);
    ``channel_states`` (N, M) state names and ``rates_bps`` (N, M) the model's rate of every device-round (bit/s).
    """
    config: RunConfig
    base_model: object
    lora: object
    num_units: int
    hidden_size: int
    wire_dtype: torch.dtype
    cost_model: object
    profile: object
    channel_states: object
    rates_bps: object

    @classmethod
    def build(cls, cfg: RunConfig) -> "RunPlan":
        """Load the base model and derive the rest. Raises ValueError for a configuration that cannot run."""
        base = build_base_model(cfg)
        cm, prof = cost_model(cfg, base.config)
        states, rates = channel_rates(cfg)
        return cls(cfg, base, lora_config(cfg), num_units(base, cfg.train.granularity), int(base.config.hidden_size),
                   wire_dtype_of(cfg.train.wire_dtype), cm, prof, states, rates)

    def device_batches(self) -> list[list[dict]]:
        """Every device's mini-batches (:func:`device_batches`)."""
        return device_batches(self.config, self.base_model.config.vocab_size)

    def decide_cut(self, n: int, m: int, flops_per_s: float, memory_bytes: float, rate_bps: float) -> int:
        """Cut layer of device m in round n from its reported profile and the up-link rate (:func:`decide_cut`)."""
        return decide_cut(self.config, self.cost_model, n, m, flops_per_s, memory_bytes, rate_bps, self.num_units)

    def round_cuts(self, n: int, profiles, rates_bps) -> list[int]:
        """Cut layer of every device in round n of a parallel mode (:func:`round_cuts`)."""
        return round_cuts(self.config, self.cost_model, n, profiles, rates_bps, self.num_units)

    def planned_cuts(self) -> list[list[int]]:
        """Cut of every (round, device) when every device reports its configured profile and the model's rate
        (per round and jointly for the parallel modes: :meth:`round_cuts`)."""
        cfg = self.config
        if cfg.mode != "sequential":
            profiles = [device_profile(cfg, m) for m in range(cfg.num_devices)]
            return [self.round_cuts(n, profiles, self.rates_bps[n]) for n in range(cfg.rounds)]
        return [[self.decide_cut(n, m, *device_profile(cfg, m), self.rates_bps[n, m]) for m in range(cfg.num_devices)]
                for n in range(cfg.rounds)]


def planned_cuts(cfg: RunConfig) -> list[list[int]]:
    """Cut of every (round, device) when every device reports its configured profile (:meth:`RunPlan.planned_cuts`)."""
    return RunPlan.build(cfg).planned_cuts()


def run_in_process(cfg: RunConfig, skip=(), cuts=None, lost=None) -> SplitTrainer:
    """The same run with the in-process :class:`SplitTrainer` in ``cfg.mode``; ``skip``: (round, device) turns left
    out; ``lost`` (parallel modes): {(round, device): mini-batches the server applied before it lost the device}
    (:func:`splitlora.training.federated.run_parallel`); ``cuts``: the cut of every (round, device) (N x M),
    default :meth:`RunPlan.planned_cuts`. Raises ValueError for
    ``cut: card`` with ``link.rate_source: measured`` and no ``cuts``: those decisions depend on measured transfer
    times, so pass the cuts the server logged."""
    if cuts is None and cfg.cut == "card" and cfg.link.rate_source == "measured":
        raise InvalidParameterError("cuts=None is invalid with link.rate_source='measured' and cut='card': CARD's "
                                    "decisions depend on measured transfer times; must pass the cuts the distributed "
                                    "server logged")
    plan = RunPlan.build(cfg)
    trainer = SplitTrainer(plan.base_model, plan.lora, cfg.train)
    cuts = plan.planned_cuts() if cuts is None else cuts
    data, I = plan.device_batches(), cfg.steps_per_round
    skip = set(map(tuple, skip))
    if cfg.mode != "sequential":
        lost = {**{(n, m): 0 for n, m in skip}, **{tuple(k): int(v) for k, v in (lost or {}).items()}}
        trainer.run(data, cuts, cfg.rounds, I, mode=cfg.mode, lost=lost)
        return trainer
    for n in range(cfg.rounds):
        for m in range(cfg.num_devices):
            if (n, m) in skip:
                continue
            for i in range(I):
                trainer.step(data[m][(n * I + i) % len(data[m])], m, cuts[n][m], n)
    return trainer

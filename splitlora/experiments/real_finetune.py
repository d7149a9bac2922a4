"""Split fine-tuning of a real pretrained LLM on GSM8K: what split learning does to its quality (notebook
``real_finetune``; docs/split-training.md, "Real model").

One :class:`FinetuneSetup` (model, tokenizer, each device's mini-batches, the held-out set) feeds three experiments:
:func:`finetune_quality` (held-out answer loss and accuracy before/after; split against unsplit peft training),
:func:`wire_dtype_effect` (bf16 / fp16 smashed data and gradients against fp32) and :func:`compute_profile`
(measured per-cut compute time and memory against the delay model).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from typing import Sequence

import pandas as pd

from splitlora._validate import check_int_range
from splitlora.errors import InvalidParameterError
from splitlora.experiments.analytic import optimal_decisions
from splitlora.model.hardware import load_hardware
from splitlora.model.profile import ATTN_TARGETS, SHIPPED_MODELS
from splitlora.model.scenario import DEVICE_NAMES, Scenario
from splitlora.training.data import load_gsm8k, tokenize_batches
from splitlora.training.evaluation import answer_loss, greedy_generate, gsm8k_accuracy
from splitlora.training.measure import measure_and_predict
from splitlora.training.models import load_model_and_tokenizer
from splitlora.training.split import num_targets, num_units, shared_weight_copy
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer, logs_frame, unsplit_training


@dataclass
class FinetuneSetup:
    """Everything the experiments share (built by :func:`prepare_finetune`).

    model / tokenizer: the frozen base model (never modified) and its tokenizer. architecture: the name CARD's
    analytic model uses (a ``data/models`` name or a config folder). train: per device, its mini-batches
    ({input_ids, attention_mask, labels}, each (B, s)); heldout: mini-batches of the held-out answer-loss set;
    generate_set: GSM8K records for exact-match accuracy. lora: the peft ``LoraConfig``; config: the
    :class:`~splitlora.training.trainer.SplitTrainConfig`; rounds, steps_per_round: N and I; devices: their names.
    """
    model: object
    tokenizer: object
    architecture: str
    train: list
    heldout: list
    generate_set: object
    lora: object
    config: object
    rounds: int
    steps_per_round: int
    devices: tuple
    chat_template: bool = False
    max_new_tokens: int = 160
    info: dict = field(default_factory=dict)

    def order(self) -> list:
        """The mini-batches in training order (round n, device m, step i), as split training visits them."""
        I = self.steps_per_round
        return [self.train[m][(n * I + i) % len(self.train[m])]
                for n in range(self.rounds) for m in range(len(self.devices)) for i in range(I)]


def prepare_finetune(model_name_or_path: str = "smollm2-135m", data: str = "gsm8k", *,
                     devices: Sequence[str] = DEVICE_NAMES, rounds: int = 2, steps_per_round: int = 2,
                     batch_size: int = 4, seq_len: int = 256, n_heldout: int = 200, n_generate: int = 32,
                     max_new_tokens: int = 160, lora_rank: int = 8, lora_alpha: int = 16,
                     lora_targets: Sequence[str] = ATTN_TARGETS, lr: float = 2e-3,
                     compute_dtype: str = "bfloat16", granularity: str = "block", chat_template: bool = False,
                     seed: int = 0, model=None, tokenizer=None) -> FinetuneSetup:
    """Load the model and GSM8K and cut the data into device shards and held-out sets.

    Training records: the first M x N x I x B records of ``data``'s train split (M devices, N rounds, I steps per
    round, B per mini-batch), device m holding mini-batches m, m + M, ...; held-out: the first ``n_heldout``
    records of the test split, sorted by length and padded to the longest of each mini-batch (the loss is
    token-weighted, so the order does not matter); accuracy: the first ``n_generate`` test records.
    ``seq_len`` tokens per training record (longer ones are truncated, with a warning that counts them).
    ``model``/``tokenizer``: an already loaded pair (skips loading ``model_name_or_path``). Raises ValueError for a
    bad size or name.
    """
    from peft import LoraConfig


    known = load_hardware()
    if isinstance(devices, str) or not devices:
        raise InvalidParameterError(f"devices={devices!r} is invalid: must be a non-empty list of {list(known.devices)}")
    devices = tuple(known.device_key(d, "devices") for d in devices)
    for name, v, hi in (("rounds", rounds, 10**5), ("steps_per_round", steps_per_round, 10**5),
                        ("batch_size", batch_size, 4096), ("seq_len", seq_len, 1 << 16),
                        ("n_heldout", n_heldout, 1319), ("n_generate", n_generate, 1319),
                        ("max_new_tokens", max_new_tokens, 4096)):
        check_int_range(name, v, 0 if name == "n_generate" else 1, hi)
    if (model is None) != (tokenizer is None):
        raise InvalidParameterError("model and tokenizer are invalid: give both (an already loaded pair) or neither")
    if model is None:
        model, tokenizer = load_model_and_tokenizer(model_name_or_path, seed=seed)
    M, N, I, B = len(devices), rounds, steps_per_round, batch_size
    need = M * N * I * B
    train_ds = load_gsm8k(data, split="train", limit=need)
    if len(train_ds) < need:
        raise InvalidParameterError(f"data={data!r} is invalid: holds {len(train_ds)} training records, must hold {need}")
    batches = tokenize_batches(train_ds, tokenizer, B, seq_len, padding="longest", chat_template=chat_template)
    train = [batches[m::M] for m in range(M)]
    test = load_gsm8k(data, split="test", limit=max(n_heldout, n_generate))
    held = test.select(range(n_heldout))
    lengths = [len(q) + len(a) for q, a in zip(held["question"], held["answer"])]
    held = held.select(sorted(range(len(held)), key=lengths.__getitem__))
    heldout = tokenize_batches(held, tokenizer, 8, 4 * seq_len, padding="longest", drop_last=False,
                               chat_template=chat_template)
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(lora_targets))
    cfg = SplitTrainConfig(lr=lr, granularity=granularity, compute_dtype=compute_dtype, seed=seed)
    key = str(model_name_or_path).lower()
    arch = key if key in SHIPPED_MODELS else str(model_name_or_path)
    return FinetuneSetup(model, tokenizer, arch, train, heldout, test.select(range(n_generate)), lora, cfg, N, I,
                         devices, chat_template, max_new_tokens,
                         info=dict(train_records=need, heldout_records=n_heldout, generate_records=n_generate,
                                   heldout_tokens=sum(num_targets(b["labels"]) for b in heldout)))


def card_cuts(setup: FinetuneSetup, *, w: float = 0.1, schedule: str = "sequential",
              channel_state: str = "Normal"):
    """CARD's cut layer and server clock for each device of ``setup``, from the analytic model of this very
    architecture and workload (B, s = the longest training mini-batch, LoRA rank, I, bf16 weights and wire), as
    a pandas DataFrame (columns of :func:`splitlora.experiments.analytic.optimal_decisions`)."""
    s = max(int(b["input_ids"].shape[1]) for dev in setup.train for b in dev)
    B = int(setup.train[0][0]["input_ids"].shape[0])
    sc = Scenario(model=setup.architecture, granularity=setup.config.granularity, batch_size=B, seq_len=s,
                  lora_rank=int(setup.lora.r), steps_per_round=setup.steps_per_round, w=w,
                  devices=setup.devices, schedule=schedule)
    return optimal_decisions(sc, channel_state=channel_state, weights=(w,))


def _trained(setup: FinetuneSetup, cuts, wire_dtype: str):

    cuts = list(cuts)
    if len(cuts) != len(setup.devices):
        raise InvalidParameterError(f"cuts={cuts!r} is invalid: must hold one cut layer per device ({len(setup.devices)})")
    for c in cuts:
        check_int_range("cuts", c, 0, num_units(setup.model, setup.config.granularity))
    trainer = SplitTrainer(setup.model, setup.lora, replace(setup.config, wire_dtype=wire_dtype))
    trainer.run(setup.train, lambda n, m: cuts[m], rounds=setup.rounds, steps_per_round=setup.steps_per_round)
    return trainer


def finetune_quality(setup: FinetuneSetup, cuts: Sequence[int], *, n_export_check: int = 32,
                     n_export_generate: int = 4) -> dict:
    """Held-out answer loss and GSM8K accuracy before and after split fine-tuning, split against unsplit.

    Trains (1) split: the devices of ``setup`` taking turns, device m at cut layer ``cuts[m]``, fp32 wire; (2) the
    reference: ordinary peft training of the unsplit model on the same mini-batches in the same order
    (:func:`splitlora.training.trainer.unsplit_training`). The exported PEFT adapter of (1) is loaded into the unsplit
    model and checked on the first ``n_export_check`` held-out records and ``n_export_generate`` generations.

    Returns a dict of pandas DataFrames: ``steps`` (step, round, device, cut_layer, loss_split, loss_unsplit,
    loss_abs_diff), ``summary`` (stage, model, heldout_loss, heldout_tokens, heldout_records, accuracy,
    generate_records), ``generations`` (per accuracy record: stage, question, reference, generated, predicted,
    rule, correct), ``export`` (subset loss of split and exported, their difference, generations equal), and the
    ``trainer``.
    """
    from peft import PeftModel


    cd = setup.config.compute_dtype
    gen_kw = dict(max_new_tokens=setup.max_new_tokens, chat_template=setup.chat_template, compute_dtype=cd)
    rows, gens = [], []

    def record(stage, name, model):
        loss = answer_loss(model, setup.heldout, compute_dtype=cd)
        acc, table = (gsm8k_accuracy(model, setup.tokenizer, setup.generate_set, **gen_kw)
                      if len(setup.generate_set) else (float("nan"), pd.DataFrame()))
        rows.append(dict(stage=stage, model=name, heldout_loss=loss["loss"], heldout_tokens=loss["tokens"],
                         heldout_records=loss["records"], accuracy=acc, generate_records=len(table)))
        gens.append(table.assign(stage=stage))

    record("before", "base model (LoRA B = 0)", setup.model)
    ref, ref_losses = unsplit_training(setup.model, setup.lora, setup.order(), setup.config)
    trainer = _trained(setup, cuts, "float32")
    record("after", "split (devices taking turns)", trainer)
    steps = logs_frame(trainer.logs).rename(columns={"loss": "loss_split"})
    steps["loss_unsplit"] = ref_losses
    steps["loss_abs_diff"] = (steps["loss_split"] - steps["loss_unsplit"]).abs()
    with tempfile.TemporaryDirectory() as tmp:
        trainer.export_adapter(tmp)
        exported = PeftModel.from_pretrained(shared_weight_copy(setup.model), tmp)
        k = min(n_export_check, len(setup.heldout[0]["input_ids"]) * len(setup.heldout))
        sub = _first_records(setup.heldout, k)
        split_sub, exp_sub = answer_loss(trainer, sub, compute_dtype=cd), answer_loss(exported, sub, compute_dtype=cd)
        qs = list(setup.generate_set["question"][:n_export_generate])
        same = (greedy_generate(trainer, setup.tokenizer, qs, **gen_kw)
                == greedy_generate(exported, setup.tokenizer, qs, **gen_kw)) if qs else True
    export = pd.DataFrame([dict(records=split_sub["records"], tokens=split_sub["tokens"],
                                loss_split=split_sub["loss"], loss_exported=exp_sub["loss"],
                                loss_abs_diff=abs(split_sub["loss"] - exp_sub["loss"]),
                                generations_compared=len(qs), generations_equal=bool(same))])
    return dict(steps=steps[["step", "round", "device", "cut_layer", "loss_split", "loss_unsplit", "loss_abs_diff"]],
                summary=pd.DataFrame(rows), generations=pd.concat(gens, ignore_index=True), export=export,
                trainer=trainer, reference=ref)


def _first_records(batches, k: int) -> list:
    """The first ``k`` sequences of ``batches`` as mini-batches (the last one cut short)."""
    out, left = [], k
    for b in batches:
        if left <= 0:
            break
        out.append({n: t[:left] for n, t in b.items()})
        left -= int(b["input_ids"].shape[0])
    return out


def wire_dtype_effect(setup: FinetuneSetup, reference_losses: Sequence[float], reference_heldout: float, *,
                      cut_layer: int | None = None, wire_dtypes: Sequence[str] = ("bfloat16", "float16")):
    """Lossy smashed data and gradients: split training with every device at ``cut_layer`` (default L/2) and the
    wire in each of ``wire_dtypes``, against fp32 (``reference_losses`` per step and ``reference_heldout``: the
    split model after :func:`finetune_quality`: fp32 split training equals unsplit training exactly at any cut, so
    its per-step losses are those of every fp32 cut).

    Returns ``(steps, summary)`` DataFrames: steps (wire_dtype, step, cut_layer, loss, loss_fp32, loss_abs_diff)
    and summary (wire_dtype, cut_layer, heldout_loss, heldout_loss_fp32, heldout_diff, max_step_loss_diff,
    bytes_up and bytes_down per step, mean).
    """

    L = num_units(setup.model, setup.config.granularity)
    cut = L // 2 if cut_layer is None else int(cut_layer)
    check_int_range("cut_layer", cut, 0, L)
    steps, summary = [], []
    ref = list(reference_losses)
    for wd in wire_dtypes:
        trainer = _trained(setup, [cut] * len(setup.devices), wd)
        losses = [x.loss for x in trainer.logs]
        if len(losses) != len(ref):
            raise InvalidParameterError(f"reference_losses has {len(ref)} steps, must have {len(losses)}")
        diff = [abs(a - b) for a, b in zip(losses, ref)]
        steps += [dict(wire_dtype=wd, step=i, cut_layer=cut, loss=a, loss_fp32=b, loss_abs_diff=d)
                  for i, (a, b, d) in enumerate(zip(losses, ref, diff))]
        held = answer_loss(trainer, setup.heldout)["loss"]
        summary.append(dict(wire_dtype=wd, cut_layer=cut, heldout_loss=held, heldout_loss_fp32=reference_heldout,
                            heldout_diff=held - reference_heldout, max_step_loss_diff=max(diff),
                            bytes_up=sum(x.bytes_up for x in trainer.logs) / len(losses),
                            bytes_down=sum(x.bytes_down for x in trainer.logs) / len(losses)))
    return pd.DataFrame(steps), pd.DataFrame(summary)


def compute_profile(setup: FinetuneSetup, cuts: Sequence[int] | None = None, *, batch_size: int = 1,
                    seq_len: int = 128, repeats: int = 2, threads: int = 1, clock: str = "cpu"):
    """Measured device/server compute time and device memory per cut of this real model (fp32, ``threads``
    torch threads, ``clock`` time) against the delay model's prediction
    (:func:`splitlora.training.measure.measure_and_predict` with ``model=setup.model``; the host FLOP/s calibrated on the
    unsplit step, so ``cuts`` must include L). Default cuts: 0, L/6, ..., L. One row per cut."""
    L = num_units(setup.model, setup.config.granularity)
    cuts = sorted({round(k * L / 6) for k in range(7)}) if cuts is None else sorted({int(c) for c in cuts})
    return measure_and_predict(model=setup.model, cuts=cuts, granularity=setup.config.granularity,
                               batch_size=batch_size, seq_len=seq_len, lora_rank=int(setup.lora.r),
                               lora_alpha=int(setup.lora.lora_alpha),
                               lora_targets=tuple(sorted(setup.lora.target_modules)), repeats=repeats, warmup=1,
                               warmup_each_cut=False, clock=clock, threads=threads)

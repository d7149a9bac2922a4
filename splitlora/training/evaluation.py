"""Evaluation of a split (or unsplit) causal LM: logits, answer-token loss, greedy generation, GSM8K accuracy.

Every function takes a "language model" in one of three forms, wrapped by :func:`as_lm`: a
:class:`~splitlora.training.trainer.SplitTrainer` (its split model at the current cut), a :class:`SplitLM` (device part
-> wire -> server part), or a Hugging Face / peft causal LM (e.g. the unsplit model with the exported adapter).
Reference: docs/split-training.md, "Evaluation".
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from splitlora._validate import check_choice, check_int_range
from splitlora.errors import InvalidParameterError
from splitlora.training.data import encode_prompt
from splitlora.training.split import (COMPUTE_DTYPES, DevicePart, ServerPart, causal_lm_loss, compute_context,
                                      num_targets, wire_dtype_of)
from splitlora.training.step import to_wire

ANSWER_RULES = ("after ####", "last number", "none")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


class SplitLM:
    """A split model used as one language model: device part, cast to the wire dtype, server part.

    ``lm(input_ids (B, s), attention_mask=None, position_ids=None, cache=None)`` returns logits (B, s, V) in fp32
    or the compute dtype. ``cache`` is :meth:`new_cache` (one KV cache per side, as two hosts would keep).
    Args: ``device`` / ``server`` from :func:`splitlora.training.split.split_model`; ``wire_dtype`` of the smashed data;
    ``compute_dtype`` ``"float32"`` or ``"bfloat16"`` (autocast). ``modules``: the models to put in eval mode.
    """
    def __init__(self, device: DevicePart, server: ServerPart, wire_dtype: str = "float32",
                 compute_dtype: str = "float32", modules: Sequence[nn.Module] = ()):
        check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
        self.device, self.server, self.wire = device, server, wire_dtype_of(wire_dtype)
        self.compute_dtype = compute_dtype
        self.modules = list(modules) or [device, server]
        self.hf = device._hf[0]
        self.config = self.hf.config

    def new_cache(self):
        """``(device cache, server cache)``: one empty transformers KV cache per side."""
        return _new_cache(self.config), _new_cache(self.config)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        dc, sc = cache if cache is not None else (None, None)
        with compute_context(self.compute_dtype, input_ids.device.type):
            h = self.device(input_ids, attention_mask, position_ids, dc)
            if self.device.is_full:
                return h
            x = to_wire(h, self.wire).hidden.to(h.dtype)
            return self.server(x, attention_mask, position_ids, sc)


class _HFLM:
    """A Hugging Face / peft causal LM behind the same call as :class:`SplitLM`."""
    def __init__(self, model: nn.Module, compute_dtype: str = "float32"):
        check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
        self.model, self.compute_dtype, self.modules, self.hf = model, compute_dtype, [model], model
        self.config = model.config

    def new_cache(self):
        return _new_cache(self.config)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        with compute_context(self.compute_dtype, input_ids.device.type):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, use_cache=cache is not None).logits


def _new_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def as_lm(model, compute_dtype: str | None = None):
    """Wrap ``model`` for evaluation: a SplitTrainer (:meth:`~splitlora.training.trainer.SplitTrainer.split_lm`), a
    :class:`SplitLM` (as is) or an ``nn.Module`` causal LM. ``compute_dtype`` overrides the trainer's / defaults
    to ``"float32"``. Raises TypeError for anything else."""
    if isinstance(model, SplitLM):
        return model
    if hasattr(model, "split_lm"):
        return model.split_lm(compute_dtype=compute_dtype)
    if isinstance(model, nn.Module):
        return _HFLM(model, compute_dtype or "float32")
    raise TypeError(f"model of type {type(model).__name__} is invalid: must be a SplitTrainer, SplitLM or a "
                    "causal LM nn.Module")


class _EvalMode:
    """no_grad + eval() on the wrapped models, their training flags restored afterwards."""
    def __init__(self, lm):
        self.mods = lm.modules

    def __enter__(self):
        self.flags = [m.training for m in self.mods]
        self.grad = torch.no_grad()
        self.grad.__enter__()
        for m in self.mods:
            m.eval()

    def __exit__(self, *exc):
        for m, f in zip(self.mods, self.flags):
            m.train(f)
        self.grad.__exit__(*exc)


def logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, s, V) of ``model`` (see :func:`as_lm`) for ``input_ids`` (B, s), without gradients, eval mode."""
    lm = as_lm(model)
    with _EvalMode(lm):
        return lm(input_ids, attention_mask)


def answer_loss(model, batches: Sequence[Mapping[str, torch.Tensor]], *, compute_dtype: str | None = None) -> dict:
    """Mean cross-entropy over the target tokens of ``batches`` (labels -100 ignored, causal shift), token-weighted
    over the whole set: with :func:`splitlora.training.data.tokenize_batches` (``loss_on="answer"``) the held-out answer loss.

    Returns ``{"loss": nats per token, "tokens": target tokens, "records": sequences}``. Raises ValueError for an
    empty set or one without target tokens.
    """
    if not batches:
        raise InvalidParameterError("batches=[] is invalid: must hold at least one mini-batch")
    lm = as_lm(model, compute_dtype)
    total, count, records = 0.0, 0, 0
    with _EvalMode(lm):
        for b in batches:
            n = num_targets(b["labels"])
            if n:  # the model's own causal-LM loss (a mean over n targets), as in training
                total += float(causal_lm_loss(lm.hf, lm(b["input_ids"]), b["labels"])) * n
            count += n
            records += int(b["input_ids"].shape[0])
    if count == 0:
        raise InvalidParameterError("batches are invalid: no target token (every label is -100)")
    return {"loss": total / count, "tokens": count, "records": records}


def greedy_generate(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 16,
                    chat_template: bool = False, compute_dtype: str | None = None) -> list[str]:
    """Greedy (argmax) continuations of the prompts of ``questions`` (:func:`splitlora.training.data.encode_prompt`), with a KV
    cache on each side, left padding and explicit position ids; a sequence stops at the tokenizer's EOS or after
    ``max_new_tokens``. Returns the decoded continuations (special tokens skipped), in order."""
    check_int_range("max_new_tokens", max_new_tokens, 1, 10**5)
    check_int_range("batch_size", batch_size, 1, 10**5)
    lm = as_lm(model, compute_dtype)
    where = next(lm.modules[0].parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = []
    with _EvalMode(lm):
        for i in range(0, len(questions), batch_size):
            prompts = [encode_prompt(tokenizer, q, chat_template) for q in questions[i:i + batch_size]]
            P = max(map(len, prompts))
            ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=where)
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=where)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = lm.new_cache()
            out = lm(ids, mask, pos, cache)
            done = torch.zeros(len(prompts), dtype=torch.bool, device=where)
            new = []
            for _ in range(max_new_tokens):
                nxt = out[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                new.append(nxt)
                done |= nxt == eos
                if bool(done.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                out = lm(nxt[:, None], mask, pos, cache)
            gen = torch.stack(new, dim=1)
            for row in gen.tolist():
                if eos in row:
                    row = row[:row.index(eos)]
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def extract_answer(text: str) -> tuple[float | None, str]:
    """The final number of a GSM8K-style answer and the rule that found it: the first number after ``####``
    (GSM8K's own format), else the last number of the text, else ``(None, "none")``. Commas and ``$`` dropped."""
    head, sep, tail = text.partition("####")
    for rule, where in (("after ####", tail if sep else ""), ("last number", text)):
        found = _NUMBER.findall(where)
        if found:
            tok = found[0] if rule == "after ####" else found[-1]
            try:
                return float(tok.replace(",", "").replace("$", "")), rule
            except ValueError:
                continue
    return None, "none"


def gsm8k_accuracy(model, tokenizer, dataset, *, max_new_tokens: int = 256, batch_size: int = 16,
                   chat_template: bool = False, compute_dtype: str | None = None):
    """Exact-match accuracy on GSM8K records (``question``, ``answer`` ending ``#### <n>``): greedy generation
    (:func:`greedy_generate`), the predicted number by :func:`extract_answer`, correct when it equals the reference
    number. Returns ``(accuracy, table)``: the share correct and a pandas DataFrame per record (question,
    reference, generated, predicted, rule, correct)."""
    qs, refs = list(dataset["question"]), [extract_answer(a)[0] for a in dataset["answer"]]
    gens = greedy_generate(model, tokenizer, qs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           chat_template=chat_template, compute_dtype=compute_dtype)
    rows = []
    for q, r, g in zip(qs, refs, gens):
        pred, rule = extract_answer(g)
        ok = pred is not None and r is not None and math.isclose(pred, r, rel_tol=0, abs_tol=1e-9)
        rows.append(dict(question=q, reference=r, generated=g, predicted=pred, rule=rule, correct=bool(ok)))
    table = pd.DataFrame(rows)
    return (float(table["correct"].mean()) if len(table) else float("nan")), table

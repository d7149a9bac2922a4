"""Exact splitting of a Hugging Face decoder-only causal LM into a device part and a server part.

The device part runs the token embedding and units 1..c, the server part units c+1..L, the final norm, the LM
head and the loss; a unit is a decoder block or half of one, and only the hidden state at the cut (with the
optional padding mask) crosses the wire. Source: docs/split-training.md, "Split model".
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from splitlora._validate import check_choice, check_int_range
from splitlora.errors import InvalidParameterError
from splitlora.model.profile import GRANULARITIES

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# compute precision of forward and backward: fp32, or bf16 mixed precision (torch.autocast; weights, LoRA
# parameters, optimiser state and the residual stream stay fp32)
COMPUTE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def compute_context(compute_dtype: str, device_type: str = "cpu"):
    """The context a forward runs in: ``torch.autocast(device_type, bfloat16)`` for ``"bfloat16"``, a no-op for
    ``"float32"``. Raises ValueError naming the allowed values (``COMPUTE_DTYPES``)."""
    check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    dt = COMPUTE_DTYPES[compute_dtype]
    return contextlib.nullcontext() if dt is None else torch.autocast(device_type=device_type, dtype=dt)


def shared_weight_copy(model: nn.Module, share_trainable: bool = True) -> nn.Module:
    """A deep copy of ``model`` (module tree, buffers) whose parameters alias the original's storage instead of
    copying it: new ``nn.Parameter`` objects (so ``requires_grad`` flags stay independent) over the same data.
    With ``share_trainable=False`` only frozen parameters (``requires_grad=False``) are aliased and trainable ones
    (e.g. LoRA) are copied. Ties (one parameter used twice) are kept. Memory: one copy of the weights in all."""
    memo = {}
    for p in model.parameters():
        if share_trainable or not p.requires_grad:
            memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


# ----------------------------------------------------------------------------------------------- helpers
def wire_dtype_of(name: str) -> torch.dtype:
    """Map a wire-dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``) to a torch dtype.

    Raises ValueError naming the allowed names.
    """
    check_choice("wire_dtype", name, WIRE_DTYPES)
    return WIRE_DTYPES[name]


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's elements (numel x element size); 0 for None. Unit: byte."""
    return 0 if t is None else t.numel() * t.element_size()


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the Hugging Face ``*ForCausalLM`` inside a ``PeftModel`` (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def check_architecture(model: nn.Module) -> None:
    """Raise ValueError unless ``model`` is a causal LM of a supported family (``SUPPORTED_MODEL_TYPES``).

    The check needs ``model.config.model_type``, ``model.model.layers`` with ``input_layernorm``,
    ``self_attn``, ``post_attention_layernorm`` and ``mlp`` in each block, ``model.model.embed_tokens``,
    ``model.model.norm``, ``model.model.rotary_emb`` and ``model.lm_head``.
    """
    hf = _unwrap(model)
    mtype = getattr(getattr(hf, "config", None), "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise InvalidParameterError(
            f"model_type={mtype!r} is invalid: must be one of {list(SUPPORTED_MODEL_TYPES)} "
            "(split_model supports Llama-family, Qwen2 and Mistral causal LMs)"
        )
    inner = getattr(hf, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(hf, "lm_head"):
        raise InvalidParameterError(f"model of type {type(hf).__name__} is invalid: must be a *ForCausalLM with "
                         f".model.{{{', '.join(needed)}}} and .lm_head")
    for i, layer in enumerate(inner.layers):
        for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, a):
                raise InvalidParameterError(f"model.model.layers[{i}] has no {a!r}: unsupported block layout")


def is_tied(model: nn.Module) -> bool:
    """True if the LM head weight is the embedding matrix (``tie_word_embeddings``)."""
    hf = _unwrap(model)
    head_w = _base_weight(hf.lm_head)
    emb_w = _base_weight(hf.model.embed_tokens)
    return head_w is emb_w or bool(getattr(hf.config, "tie_word_embeddings", False))


def _base_weight(module: nn.Module) -> torch.Tensor:
    """Frozen weight of a plain or LoRA-wrapped Linear/Embedding."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.weight


def _has_lora(module: nn.Module) -> bool:
    return any("lora_" in n for n, _ in module.named_parameters())


def check_lora_targets(model: nn.Module) -> None:
    """Refuse LoRA on a tied embedding / LM head (the two copies would drift apart after splitting).

    Raises ValueError naming the offending module.
    """
    hf = _unwrap(model)
    if is_tied(hf):
        for name, mod in (("lm_head", hf.lm_head), ("embed_tokens", hf.model.embed_tokens)):
            if _has_lora(mod):
                raise InvalidParameterError(
                    f"LoRA target {name!r} is invalid: the model ties the embedding and the LM head "
                    "(tie_word_embeddings=True); split training keeps a frozen copy of the head on the server, "
                    "so adapting a tied layer is refused. Remove it from target_modules.")


def num_units(model: nn.Module, granularity: str = "block") -> int:
    """L, the number of cut points: blocks (``"block"``) or 2 x blocks (``"sublayer"``)."""
    check_choice("granularity", granularity, GRANULARITIES)
    n = len(_unwrap(model).model.layers)
    return n if granularity == "block" else 2 * n


# ----------------------------------------------------------------------------------------------- context
@dataclass
class _Context:
    """What every block needs besides the hidden state: rebuilt locally from shapes on each side."""
    position_ids: torch.Tensor  # (1, s), or (B, s) when given (generation with left padding)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (1 or B, s, head_dim)
    masks: dict  # layer type -> mask in the format of the attention implementation (or None)
    cache: object = None  # a transformers Cache (KV cache of generation) or None (training)


def _build_context(hf: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                   layer_types: set[str], position_ids: torch.Tensor | None = None, cache=None,
                   first_layer: int | None = None) -> _Context:
    """Rebuild position ids, rotary embeddings and masks from ``hidden`` (B, s, H) and the padding mask.

    With a KV ``cache`` the positions continue after the tokens that the first layer of this part
    (``first_layer``) has cached, and the masks cover cached + new tokens (``attention_mask`` then (B, past + s)).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    s = hidden.shape[1]
    if position_ids is None:
        past = cache.get_seq_length(first_layer) if cache is not None and first_layer is not None else 0
        position_ids = torch.arange(past, past + s, device=hidden.device).unsqueeze(0)
    pe = hf.model.rotary_emb(hidden, position_ids=position_ids)
    kw = dict(config=hf.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
              position_ids=position_ids, layer_idx=first_layer if cache is not None else None)
    masks = {}
    for t in layer_types:
        masks[t] = create_sliding_window_causal_mask(**kw) if t == "sliding_attention" else create_causal_mask(**kw)
    return _Context(position_ids, pe, masks, cache)


def _layer_type(hf: nn.Module, k: int) -> str:
    """Mask kind of block k: ``config.layer_types`` (Qwen2), else Mistral's model-wide sliding window."""
    types = getattr(hf.config, "layer_types", None)
    if types:
        return types[k]
    if hf.config.model_type == "mistral" and getattr(hf.config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


# ----------------------------------------------------------------------------------------------- units
class _BlockUnit(nn.Module):
    """One whole decoder block (its own forward, so it is the exact unsplit computation)."""
    def __init__(self, layer: nn.Module, layer_type: str, layer_idx: int):
        super().__init__()
        self.layer = layer
        self.layer_type, self.layer_idx = layer_type, layer_idx

    def forward(self, h: torch.Tensor, ctx: _Context) -> torch.Tensor:
        out = self.layer(h, attention_mask=ctx.masks[self.layer_type], position_ids=ctx.position_ids,
                         position_embeddings=ctx.position_embeddings, cache=ctx.cache,
                         use_cache=ctx.cache is not None)
        return out[0] if isinstance(out, tuple) else out


class _AttentionUnit(nn.Module):
    """Unit 2k-1: h + self_attn(input_layernorm(h)) of block k."""
    def __init__(self, layer: nn.Module, layer_type: str, layer_idx: int):
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.layer_type, self.layer_idx = layer_type, layer_idx

    def forward(self, h: torch.Tensor, ctx: _Context) -> torch.Tensor:
        a, _ = self.self_attn(hidden_states=self.input_layernorm(h), attention_mask=ctx.masks[self.layer_type],
                              position_ids=ctx.position_ids, position_embeddings=ctx.position_embeddings,
                              cache=ctx.cache, use_cache=ctx.cache is not None)
        return h + a


class _MLPUnit(nn.Module):
    """Unit 2k: h + mlp(post_attention_layernorm(h)) of block k."""
    layer_type = None
    layer_idx = None

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp

    def forward(self, h: torch.Tensor, ctx: _Context) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))


def _units(hf: nn.Module, granularity: str) -> list[nn.Module]:
    out = []
    for k, layer in enumerate(hf.model.layers):
        t = _layer_type(hf, k)
        if granularity == "block":
            out.append(_BlockUnit(layer, t, k))
        else:
            out += [_AttentionUnit(layer, t, k), _MLPUnit(layer)]
    return out


class _FrozenHead(nn.Module):
    """The server's frozen LM head of a tied-embedding model: logits = h W^T with W the embedding matrix, detached
    (no gradient reaches it; it aliases the frozen weight, no copy: LoRA on a tied layer is refused)."""
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self._weight = [weight]  # a list: not a parameter or buffer of this module (no duplicate in state dicts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self._weight[0].detach())


class _Stack(nn.Module):
    """Units run in order with one locally rebuilt context."""
    def __init__(self, hf: nn.Module, units: list[nn.Module]):
        super().__init__()
        self.units = nn.ModuleList(units)
        self._hf = [hf]  # list: keep out of the module tree (no double registration)
        self.layer_types = {u.layer_type for u in units if u.layer_type is not None}
        self.first_layer = min((u.layer_idx for u in units if u.layer_idx is not None), default=None)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None, position_ids=None,
                cache=None) -> torch.Tensor:
        if len(self.units):
            ctx = _build_context(self._hf[0], h, attention_mask, self.layer_types, position_ids, cache,
                                 self.first_layer)
            for u in self.units:
                h = u(h, ctx)
        return h


# ----------------------------------------------------------------------------------------------- parts
class DevicePart(nn.Module):
    """Embedding + units 1..c (+ final norm, LM head and loss when c = L).

    ``forward(input_ids (B, s) long, attention_mask (B, s) or None)`` returns the hidden state at the cut,
    shape (B, s, H), in the model's dtype, or, when ``cut_layer == num_units``, the logits (B, s, V).
    For generation, ``position_ids`` (B, s) and a transformers KV ``cache`` (this side's own) may be given; the
    mask then covers cached + new tokens, (B, past + s).
    """
    def __init__(self, hf: nn.Module, units: list[nn.Module], cut_layer: int, n_units: int):
        super().__init__()
        self.cut_layer, self.num_units = cut_layer, n_units
        self.is_full = cut_layer == n_units
        self.embed_tokens = hf.model.embed_tokens
        self.stack = _Stack(hf, units)
        if self.is_full:
            self.norm, self.lm_head = hf.model.norm, hf.lm_head
        self._hf = [hf]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        h = self.stack(self.embed_tokens(input_ids), attention_mask, position_ids, cache)
        if self.is_full:
            return self.lm_head(self.norm(h))
        return h

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Causal-LM loss (only when c = L): mean cross-entropy of shifted labels, -100 ignored. Scalar."""
        return causal_lm_loss(self._hf[0], logits, labels)


class ServerPart(nn.Module):
    """Units c+1..L + final norm + LM head + loss.

    ``forward(hidden (B, s, H), attention_mask (B, s) or None)`` returns logits (B, s, V); ``position_ids`` and
    ``cache`` as for :class:`DevicePart`. For a tied-embedding model the head is the frozen embedding matrix.
    Raises RuntimeError if called when ``cut_layer == num_units`` (the server is idle).
    """
    def __init__(self, hf: nn.Module, units: list[nn.Module], cut_layer: int, n_units: int):
        super().__init__()
        self.cut_layer, self.num_units = cut_layer, n_units
        self.is_idle = cut_layer == n_units
        self.stack = _Stack(hf, units)
        if not self.is_idle:
            self.norm = hf.model.norm
            self.lm_head = _FrozenHead(_base_weight(hf.lm_head)) if is_tied(hf) else hf.lm_head
        self._hf = [hf]

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        if self.is_idle:
            raise RuntimeError(f"cut_layer={self.cut_layer} = L: the device runs everything, the server is idle")
        return self.lm_head(self.norm(self.stack(hidden, attention_mask, position_ids, cache)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Causal-LM loss: mean cross-entropy of shifted labels (B, s), -100 ignored. Scalar."""
        return causal_lm_loss(self._hf[0], logits, labels)


def num_targets(labels: torch.Tensor) -> int:
    """Target tokens of labels (B, s) that the causal-LM loss averages over: positions 1..s-1 not -100."""
    return int((labels[:, 1:] != -100).sum())


def causal_lm_loss(hf: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own causal-LM loss (``model.loss_function``), exactly as in the unsplit forward."""
    hf = _unwrap(hf)
    return hf.loss_function(logits=logits, labels=labels, vocab_size=hf.config.vocab_size)


def split_model(model: nn.Module, cut_layer: int, granularity: str = "block") -> tuple[DevicePart, ServerPart]:
    """Cut a causal LM (plain or ``PeftModel``) into ``(DevicePart, ServerPart)`` at ``cut_layer``.

    Args:
        model: a Llama / Qwen2 / Mistral ``*ForCausalLM`` from transformers 5.x, or a ``PeftModel`` of one.
        cut_layer: c in 0..L (L from :func:`num_units`).
        granularity: ``"block"`` (L = blocks) or ``"sublayer"`` (L = 2 x blocks).

    Both parts share the model's modules (and its LoRA layers); the server's head of a tied model is
    its own frozen copy. Raises ValueError for an unsupported architecture, a cut outside 0..L, an
    unknown granularity, or LoRA on a tied embedding/head. Source: docs/split-training.md, "Split model".
    """
    check_architecture(model)
    check_choice("granularity", granularity, GRANULARITIES)
    hf = _unwrap(model)
    n = num_units(hf, granularity)
    check_int_range("cut_layer", cut_layer, 0, n)
    check_lora_targets(hf)
    hf.config.use_cache = False
    units = _units(hf, granularity)
    c = int(cut_layer)
    return DevicePart(hf, units[:c], c, n), ServerPart(hf, units[c:], c, n)

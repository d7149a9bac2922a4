"""One side of split training: a PeftModel instance, the LoRA parameters it owns, its AdamW, and payloads.

Source: docs/split-training.md, "Split training".
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from splitlora.training.trainer import SplitTrainConfig

def payload_bytes(obj) -> int:
    """Size of ``obj`` serialised with torch.save (what would cross the link). Unit: byte."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def roundtrip(obj):
    """Serialise and deserialise (weights_only) ``obj``: the receiver gets copies, never shared tensors."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class LoraNode:
    """One side of split training (the server, or the device in turn): a PeftModel instance, the LoRA
    parameters it owns and an AdamW over them.

    ``params`` maps every trainable (LoRA) parameter name of ``model`` to its tensor; ``owned`` lists the names
    this side trains now; every parameter it does not own is NaN, so a tensor that was never handed over cannot
    go unnoticed. A payload (:meth:`export`, :meth:`set_owned`) is ``{"params": {name: tensor},
    "opt": {name: {"exp_avg", "exp_avg_sq", "step"}}}``. Used by :class:`SplitTrainer` and by the roles of
    :mod:`splitlora.distributed.roles`.
    """

    def __init__(self, model: nn.Module, cfg: SplitTrainConfig):
        self.model, self.cfg = model, cfg
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.owned: list[str] = []
        self.part: nn.Module | None = None
        self.opt = self._make_opt({})

    def _make_opt(self, state: Mapping[str, dict]) -> torch.optim.AdamW:
        ps = [self.params[n] for n in self.owned]
        opt = torch.optim.AdamW(ps or [nn.Parameter(torch.zeros(0))], lr=self.cfg.lr, betas=self.cfg.betas,
                                eps=self.cfg.eps, weight_decay=self.cfg.weight_decay)
        for n in self.owned:
            if n in state:  # moments next to their parameter; AdamW keeps its "step" counter on the CPU
                p = self.params[n]
                opt.state[p] = {k: v.to("cpu" if k == "step" else p.device).clone() for k, v in state[n].items()}
        return opt

    def opt_state(self) -> dict[str, dict]:
        """Optimiser state of each owned parameter, by name."""
        out = {}
        for n in self.owned:
            st = self.opt.state.get(self.params[n])
            if st:
                out[n] = {k: v.detach().clone() for k, v in st.items()}
        return out

    def export(self, names: Sequence[str]) -> dict:
        """Payload of ``names``: their values and optimiser state."""
        st = self.opt_state()
        return {"params": {n: self.params[n].detach().clone() for n in names},
                "opt": {n: st[n] for n in names if n in st}}

    def set_owned(self, owned: Sequence[str], incoming: dict | None = None) -> None:
        """Own ``owned`` from now on; load ``incoming`` (a payload); every LoRA tensor not owned is NaN."""
        state = self.opt_state()
        incoming = incoming or {"params": {}, "opt": {}}
        with torch.no_grad():
            for n, v in incoming["params"].items():
                self.params[n].copy_(v)
            keep = set(owned)
            for n, p in self.params.items():
                if n not in keep:
                    p.fill_(float("nan"))
                    state.pop(n, None)
        state.update(incoming["opt"])
        self.owned = list(owned)
        self.opt = self._make_opt(state)

    def wipe(self) -> None:
        """Forget everything owned (a device leaving): NaN values, no optimiser state."""
        self.set_owned([])




def trainable_names(node: LoraNode, part: nn.Module) -> list[str]:
    """Names (in ``node.params`` order) of the trainable parameters of ``part``, a piece of ``node.model`` such as
    one side of :func:`splitlora.training.split.split_model`: the LoRA parameters that side owns at that cut."""
    ids = {id(p) for p in part.parameters() if p.requires_grad}
    return [n for n, p in node.params.items() if id(p) in ids]

"""The split step, written once (splitlora.training.step): its halves joined by the message alone equal the unsplit
model's loss and gradients, byte counts come from the message, and every caller runs these halves."""
from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

from splitlora.training.split import split_model
from splitlora.training.step import DeviceHalf, ServerHalf, SmashedData, split_step, to_wire
from tests.helpers import BLOCKS, H, V, tiny_model

B, S = 2, 9


def _lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(tiny_model(tie=False), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, S), generator=g)
    return ids, ids.clone()


@pytest.mark.parametrize("cut", [0, 1, 2 * BLOCKS - 1, 2 * BLOCKS])
def test_split_step_equals_unsplit_loss_and_gradients(cut):
    ids, labels = _batch()
    ref = _lora_model()
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    model = _lora_model()
    dev, srv = split_model(model, cut, "sublayer")
    r = split_step(DeviceHalf(dev, torch.float32), None if dev.is_full else ServerHalf(srv, torch.float32), ids,
                   labels)
    assert r.loss == pytest.approx(ref_loss.item(), abs=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=0, atol=1e-6, msg=n)
    # byte counts are the message's: hidden (B, s, H) fp32 + int64 labels up, the same hidden shape down
    if cut == 2 * BLOCKS:
        assert r.smashed is None and r.bytes_up == r.bytes_down == 0
    else:
        assert r.smashed.smashed_bytes == B * S * H * 4 and r.bytes_up == B * S * H * 4 + B * S * 8
        assert r.bytes_down == (0 if cut == 0 else B * S * H * 4)  # no device-side LoRA at c = 0: no gradient


def test_wire_dtype_and_missing_gradient():
    h = torch.randn(B, S, H, requires_grad=True)
    msg = to_wire(h, torch.bfloat16, torch.zeros(B, S, dtype=torch.long))
    assert isinstance(msg, SmashedData) and msg.hidden.dtype == torch.bfloat16 and not msg.hidden.requires_grad
    assert msg.nbytes == B * S * H * 2 + B * S * 8
    model = _lora_model()
    dev, _ = split_model(model, 3, "sublayer")
    half = DeviceHalf(dev, torch.float32)
    half.forward(*_batch())
    assert half.needs_gradient
    with pytest.raises(ValueError, match="gradient=None"):
        half.backward(None)


def _calls_backward(fn) -> bool:
    """Whether ``fn`` runs a backward or reads a gradient other than through a half (``half.backward``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in ("grad", "to_wire"):
            return True
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "backward"
                and not (isinstance(n.func.value, ast.Name) and n.func.value.id in ("half", "server"))):
            return True
    return False


def test_every_caller_runs_the_one_split_step():
    """The trainer, both distributed roles and the measurement call the halves; none writes its own backward."""
    from splitlora.distributed.roles import Device, Server
    from splitlora.training.measure import measure_cut
    from splitlora.training.trainer import SplitTrainer

    for fn in (SplitTrainer.step, Server._turn, Device._turn, measure_cut):
        src = inspect.getsource(fn)
        assert "Half(" in src or "split_step(" in src, fn.__qualname__
        assert not _calls_backward(fn), f"{fn.__qualname__} computes a backward itself"

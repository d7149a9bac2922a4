"""Splitting changes nothing: split logits and gradients equal the unsplit model's (issue 3, "Proof")."""
from __future__ import annotations

import pytest
import torch

from splitlora.training.split import SUPPORTED_MODEL_TYPES, num_units, split_model, wire_dtype_of
from splitlora.training.step import split_forward, to_wire
from tests.helpers import BLOCKS, H, V, tiny_model

B, S = 2, 11


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the second row
    return ids, mask


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_split_logits_equal_unsplit_every_cut(family, attn, tie, granularity):
    model = tiny_model(family, tie, attn)
    assert model.config._attn_implementation == attn
    ids, mask = inputs()
    with torch.no_grad():
        ref, ref_masked = model(ids).logits, model(ids, attention_mask=mask).logits
        L = num_units(model, granularity)
        assert L == (BLOCKS if granularity == "block" else 2 * BLOCKS)
        for cut in range(L + 1):
            dev, srv = split_model(model, cut, granularity)
            torch.testing.assert_close(split_forward(dev, srv, ids), ref, rtol=0, atol=1e-5)
            torch.testing.assert_close(split_forward(dev, srv, ids, mask), ref_masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,extra", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("mistral", dict(sliding_window=4)),
])
def test_split_sliding_window_families(family, extra):
    model = tiny_model(family, tie=False, attn="eager", **extra)
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for g in ("block", "sublayer"):
            for cut in range(num_units(model, g) + 1):
                dev, srv = split_model(model, cut, g)
                torch.testing.assert_close(split_forward(dev, srv, ids, mask), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_split_gradients_equal_unsplit_with_lora(granularity):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"],
                      init_lora_weights=False)  # random A and B: LoRA changes the logits
    model = get_peft_model(tiny_model("llama", tie=True), lora)
    ids, _ = inputs()
    labels = ids.clone()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for cut in range(num_units(model, granularity) + 1):
        dev, srv = split_model(model, cut, granularity)
        if dev.is_full:
            logits = dev(ids)
            loss = dev.loss(logits, labels)
            loss.backward()
        else:
            h = dev(ids)
            x = h.detach().requires_grad_(True)
            logits = srv(x)
            loss = srv.loss(logits, labels)
            loss.backward()
            if h.requires_grad:
                h.backward(x.grad)
        torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(loss, out.loss, rtol=0, atol=1e-6)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, ref[n], rtol=0, atol=1e-6, msg=f"grad of {n} at cut {cut}")
        model.zero_grad()


def test_split_parts_hold_disjoint_units_and_a_frozen_head_without_copy():
    model = tiny_model("llama", tie=True)
    dev, srv = split_model(model, 2, "sublayer")
    dev_ids = {id(p) for p in dev.parameters()}
    srv_ids = {id(p) for p in srv.parameters()}
    assert not dev_ids & srv_ids
    emb = model.model.embed_tokens.weight
    assert id(emb) in dev_ids and all(p.data_ptr() != emb.data_ptr() for p in srv.parameters())
    h = torch.randn(1, 3, model.config.hidden_size, requires_grad=True)
    srv.lm_head(h).sum().backward()  # the head reads the embedding matrix (no copy) and sends it no gradient
    assert emb.grad is None and h.grad is not None
    torch.testing.assert_close(srv.lm_head(h), h @ emb.T, rtol=0, atol=0)
    # cut 2 of 6 sub-layers: block 1 whole on the device, blocks 2 and 3 on the server
    assert id(model.model.layers[0].mlp.up_proj.weight) in dev_ids
    assert id(model.model.layers[1].self_attn.q_proj.weight) in srv_ids


def test_sublayer_cut_splits_a_block_between_attention_and_mlp():
    model = tiny_model("llama", tie=False)
    dev, srv = split_model(model, 3, "sublayer")  # unit 3 = attention of block 2
    dev_ids, srv_ids = {id(p) for p in dev.parameters()}, {id(p) for p in srv.parameters()}
    assert id(model.model.layers[1].self_attn.q_proj.weight) in dev_ids
    assert id(model.model.layers[1].mlp.up_proj.weight) in srv_ids
    assert id(model.lm_head.weight) in srv_ids


@pytest.mark.parametrize("wire,size", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_wire_message_bytes(wire, size):
    model = tiny_model()
    ids, _ = inputs()
    dev, srv = split_model(model, 1)
    h = dev(ids)
    msg = to_wire(h, wire_dtype_of(wire), labels=ids)
    assert msg.hidden.dtype == wire_dtype_of(wire) and not msg.hidden.requires_grad
    assert msg.smashed_bytes == B * S * H * size
    assert msg.nbytes == B * S * H * size + B * S * 8  # labels are int64
    if wire != "float32":  # a narrower wire changes the logits, slightly
        diff = (split_forward(dev, srv, ids, wire_dtype=wire_dtype_of(wire)) - model(ids).logits).abs().max()
        assert 0 < diff < 0.1


def test_cut_at_both_ends():
    model = tiny_model()
    L = num_units(model)
    dev, srv = split_model(model, 0)
    assert len(dev.stack.units) == 0 and len(srv.stack.units) == L
    dev, srv = split_model(model, L)
    assert dev.is_full and srv.is_idle and len(list(srv.parameters())) == 0
    with pytest.raises(RuntimeError, match="idle"):
        srv(torch.zeros(B, S, H))


def test_errors_name_the_parameter():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_model()
    with pytest.raises(ValueError, match=r"cut_layer=4 is invalid"):
        split_model(model, 4)
    with pytest.raises(ValueError, match=r"cut_layer=-1 is invalid"):
        split_model(model, -1)
    with pytest.raises(ValueError, match=r"granularity='layer' is invalid"):
        split_model(model, 1, "layer")
    with pytest.raises(ValueError, match=r"wire_dtype='int8' is invalid"):
        wire_dtype_of("int8")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match="model_type='gpt2' is invalid") as err:
        split_model(gpt2, 0)
    for t in SUPPORTED_MODEL_TYPES:
        assert t in str(err.value)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_tied_layer_is_refused(target):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tie=True), LoraConfig(r=2, target_modules=["q_proj", target]))
    with pytest.raises(ValueError, match=f"LoRA target '{target}' is invalid"):
        split_model(model, 1)

"""splitlora.model.profile held against the real transformers + peft modules.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over a real decoder layer (random fp32 weights, LoRA by peft,
only LoRA trainable), with sdpa forced to its math backend so that the CPU attention matmuls are counted (the
fused CPU flash kernel has no FLOP formula in torch). Activations: unique non-parameter storages that autograd
saves (``saved_tensors_hooks``), with sdpa's default (memory-efficient) CPU kernel.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import Qwen2Config  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from splitlora.model.profile import (MODELS_DIR, SHIPPED_MODELS, load_model_config, profile_model,  # noqa: E402
                                     t5_lora_minibatch_memory_bytes)

# The conventions of splitlora.model.profile reproduce FlopCounterMode exactly for these modules (0.000% measured);
# 0.5% (tighter than the 2% asked for) still catches a LoRA term of block 1 in the small Qwen2 model (1.4%).
FLOP_RTOL = 0.005
# Tolerance of the saved-activation formula: it leaves out tensors of size O(B s) and O(s head_dim) (RMSNorm
# rsqrt, rotary cos/sin), < 1% of a block at H >= 256; 10% leaves room for a kernel saving one more
# [B s H]-sized tensor, without admitting a missed [B s I] tensor (>= 15% of a block at I / H >= 2.75).
ACT_RTOL = 0.10
B, S = 1, 32
S_LONG = 256  # sub-layer test: long enough that attention is >= 10% of the attention unit's FLOPs
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _small_qwen2():
    return Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=64)


def _layer(cfg, targets):
    """transformers' decoder layer of cfg's family with peft LoRA (r=8) on targets; only LoRA trainable."""
    import transformers
    cfg._attn_implementation = "sdpa"
    mod = getattr(transformers.models, cfg.model_type)
    prefix = type(cfg).__name__.removesuffix("Config")
    torch.manual_seed(0)
    layer = getattr(getattr(mod, f"modeling_{cfg.model_type}"), f"{prefix}DecoderLayer")(cfg, 0).float()
    layer = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=list(targets)), layer)
    for n, p in layer.named_parameters():
        p.requires_grad_("lora_" in n)
    rot = getattr(getattr(mod, f"modeling_{cfg.model_type}"), f"{prefix}RotaryEmbedding")(cfg)
    pos = lambda x: torch.arange(x.shape[1])[None]  # noqa: E731
    attn = lambda x: x + layer.self_attn(layer.input_layernorm(x), attention_mask=None,  # noqa: E731
                                         position_embeddings=rot(x, pos(x)), position_ids=pos(x))[0]
    mlp = lambda x: x + layer.mlp(layer.post_attention_layernorm(x))  # noqa: E731
    block = lambda x: layer(x, position_embeddings=rot(x, pos(x)), position_ids=pos(x))  # noqa: E731
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    return dict(attn=attn, mlp=mlp, block=block, params=params)


def _flops(fn, x):
    """(forward FLOP, backward FLOP) of fn(x).sum(), counted by FlopCounterMode (sdpa math backend)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        y = fn(x)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as bwd:
        y.float().sum().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def _saved_bytes(fn, x, exclude=()):
    """Bytes of the unique storages autograd saves for backward in fn(x), parameters (exclude) left out."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def _rel(a, b):
    return abs(a - b) / b


@pytest.fixture(scope="module")
def llama_cfg():
    return load_model_config("llama-3.2-1b")


@pytest.fixture(scope="module")
def llama_layer(llama_cfg):
    return _layer(llama_cfg, ("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module")
def qwen_layer():
    return _layer(_small_qwen2(), ALL_TARGETS)


def _cases(request, which):
    if which == "llama":
        return request.getfixturevalue("llama_layer"), request.getfixturevalue("llama_cfg"), \
            ("q_proj", "k_proj", "v_proj", "o_proj")
    return request.getfixturevalue("qwen_layer"), _small_qwen2(), ALL_TARGETS


@pytest.mark.parametrize("which", ["llama", "qwen2"])
@pytest.mark.parametrize("first", [False, True], ids=["middle_block", "first_block"])
def test_block_flops_match_flopcounter(request, which, first):
    layer, cfg, targets = _cases(request, which)
    prof = profile_model(cfg, batch_size=B, seq_len=S, lora_targets=targets)
    x = torch.randn(B, S, cfg.hidden_size, requires_grad=not first)
    fwd, bwd = _flops(layer["block"], x)
    u = 0 if first else 1  # block 1 gets the embedding output, which does not require grad
    assert _rel(prof.unit_fwd_flops[u], fwd) < FLOP_RTOL, (prof.unit_fwd_flops[u], fwd)
    assert _rel(prof.unit_bwd_flops[u], bwd) < FLOP_RTOL, (prof.unit_bwd_flops[u], bwd)


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_sublayer_flops_match_flopcounter(request, which):
    layer, cfg, targets = _cases(request, which)
    prof = profile_model(cfg, batch_size=B, seq_len=S_LONG, granularity="sublayer", lora_targets=targets)
    for kind, u in (("attn", 2), ("mlp", 3)):  # units 3, 4 = block 2 (a middle block)
        x = torch.randn(B, S_LONG, cfg.hidden_size, requires_grad=True)
        fwd, bwd = _flops(layer[kind], x)
        assert _rel(prof.unit_fwd_flops[u], fwd) < FLOP_RTOL, (kind, prof.unit_fwd_flops[u], fwd)
        assert _rel(prof.unit_bwd_flops[u], bwd) < FLOP_RTOL, (kind, prof.unit_bwd_flops[u], bwd)


def test_head_flops_and_activations(llama_cfg):
    H, V = llama_cfg.hidden_size, llama_cfg.vocab_size
    norm = LlamaRMSNorm(H, eps=llama_cfg.rms_norm_eps).requires_grad_(False)
    head = torch.nn.utils.skip_init(torch.nn.Linear, H, V, bias=False).requires_grad_(False)
    head.weight.zero_()
    labels = torch.randint(0, V, (B, S))
    fn = lambda h: ForCausalLMLoss(head(norm(h)), labels, V)  # noqa: E731
    fwd, bwd = _flops(fn, torch.randn(B, S, H, requires_grad=True))
    saved = _saved_bytes(fn, torch.randn(B, S, H, requires_grad=True),
                         exclude={p.untyped_storage().data_ptr() for p in (norm.weight, head.weight)})
    prof = profile_model(llama_cfg, batch_size=B, seq_len=S, activation_bytes=4)
    assert _rel(prof.head_fwd_flops, fwd) < FLOP_RTOL
    assert _rel(prof.head_bwd_flops, bwd) < FLOP_RTOL
    assert _rel(prof.head_activation_bytes, saved) < ACT_RTOL


@pytest.mark.parametrize("which", ["llama", "qwen2"])
@pytest.mark.parametrize("first", [False, True], ids=["middle_block", "first_block"])
def test_block_activation_bytes_match_saved_tensors(request, which, first):
    layer, cfg, targets = _cases(request, which)
    for gran, units in (("block", {"block": 1}), ("sublayer", {"attn": 2, "mlp": 3})):
        prof = profile_model(cfg, batch_size=2, seq_len=S, granularity=gran, lora_targets=targets,
                             activation_bytes=4)
        for kind, u in units.items():
            if first:  # the first unit: its input (the embedding output) does not require grad
                if kind == "mlp":
                    continue
                u = 0
            x = torch.randn(2, S, cfg.hidden_size, requires_grad=not first)
            saved = _saved_bytes(layer[kind], x, exclude=layer["params"])
            est = prof.unit_activation_bytes[u]
            assert _rel(est, saved) < ACT_RTOL, (gran, kind, est, saved)


@pytest.mark.parametrize("gran", ["block", "sublayer"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("gate_proj",), ALL_TARGETS])
def test_split_accounting(llama_cfg, gran, targets):
    p = profile_model(llama_cfg, batch_size=3, seq_len=64, granularity=gran, lora_targets=targets)
    L = p.n_cuts
    assert L == llama_cfg.num_hidden_layers * (1 if gran == "block" else 2)
    for arr in (p.device_fwd_flops, p.server_bwd_flops, p.smashed_bytes, p.device_memory_bytes):
        assert arr.shape == (L + 1,)
    total = p.device_fwd_flops + p.device_bwd_flops + p.server_fwd_flops + p.server_bwd_flops
    np.testing.assert_allclose(total, p.total_flops, rtol=1e-12)
    dev = p.device_fwd_flops + p.device_bwd_flops
    assert np.all(np.diff(dev) > 0) and p.server_fwd_flops[-1] == 0 and p.device_fwd_flops[0] == 0
    assert np.all(np.diff(p.device_param_bytes) > 0) and np.all(np.diff(p.device_activation_bytes) >= 0)
    np.testing.assert_array_equal(p.smashed_bytes[:-1], 3 * 64 * llama_cfg.hidden_size * 2)
    assert p.smashed_bytes[-1] == 0 and p.grad_bytes[0] == 0 and p.grad_bytes[-1] == 0
    has_lora = np.concatenate([[0], np.cumsum(p.unit_lora_params)]) > 0
    np.testing.assert_array_equal(p.grad_bytes[:-1], np.where(has_lora, p.smashed_bytes, 0)[:-1])
    np.testing.assert_array_equal(p.device_lora_params + p.server_lora_params, p.unit_lora_params.sum())
    np.testing.assert_allclose(p.device_memory_bytes, p.device_param_bytes + 16 * p.device_lora_params
                               + p.device_activation_bytes)


def test_sublayer_and_block_agree(llama_cfg):
    blk = profile_model(llama_cfg, batch_size=2, seq_len=16)
    sub = profile_model(llama_cfg, batch_size=2, seq_len=16, granularity="sublayer")
    for f in ("device_fwd_flops", "device_bwd_flops", "device_memory_bytes", "server_lora_params"):
        np.testing.assert_allclose(getattr(sub, f)[::2], getattr(blk, f))
    assert sub.total_flops == pytest.approx(blk.total_flops, rel=1e-12)


@pytest.mark.parametrize("which", ["llama-3.2-1b", "qwen2"])
def test_param_and_lora_counts_match_real_model(llama_cfg, which):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    cfg = llama_cfg if which != "qwen2" else _small_qwen2()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding / head counted once
    p = profile_model(cfg, batch_size=1, seq_len=8, param_bytes=2, lora_targets=ALL_TARGETS)
    assert p.device_param_bytes[-1] == n_params * 2
    if which == "qwen2":  # count LoRA parameters on the real (small) model
        model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=8, target_modules=list(ALL_TARGETS)))
        assert p.device_lora_params[-1] == sum(q.numel() for q in model.parameters() if q.requires_grad)


# Published parameter counts (model cards / the Hub's safetensors count, 3 significant digits): total with the untied
# LM head counted (none of the three ties it), and Qwen2.5-7B's card also gives the count without embedding and head.
PUBLISHED_PARAMS = {"llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "qwen2.5-7b": 7.62e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_large_architectures_match_published_parameter_counts(name):
    cfg = load_model_config(name)
    assert cfg.tie_word_embeddings is False
    p = profile_model(cfg, batch_size=1, seq_len=8, param_bytes=1)
    total = p.device_param_bytes[-1]
    published = PUBLISHED_PARAMS[name]
    assert float(f"{total:.3g}") == published, f"{name}: {total:,.0f} parameters"  # e.g. 8,030,261,248 -> 8.03e9
    assert p.n_cuts == cfg.num_hidden_layers
    if name == "qwen2.5-7b":  # card: "Number of Parameters (Non-Embedding): 6.53B"
        assert float(f"{total - 2 * cfg.vocab_size * cfg.hidden_size:.3g}") == 6.53e9
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):  # the real module tree (q/k/v biases, untied head) gives the same count
            assert sum(q.numel() for q in AutoModelForCausalLM.from_config(cfg).parameters()) == total


def test_load_model_config_shipped_and_folder(tmp_path, llama_cfg):
    assert set(SHIPPED_MODELS) == {"llama-3.2-1b", "t5-large", "smollm2-135m", "llama-3.1-8b", "llama-3.1-70b",
                                   "qwen2.5-7b"}
    assert (llama_cfg.hidden_size, llama_cfg.num_hidden_layers, llama_cfg.num_key_value_heads) == (2048, 16, 8)
    t5 = load_model_config("t5-large")
    assert (t5.d_model, t5.num_layers, t5.num_decoder_layers, t5.vocab_size) == (1024, 24, 24, 32128)
    shutil.copy(MODELS_DIR / SHIPPED_MODELS["llama-3.2-1b"], tmp_path / "config.json")
    folder = load_model_config(tmp_path)  # the AutoConfig code path
    assert folder.to_dict()["rope_parameters"] == llama_cfg.to_dict()["rope_parameters"]
    assert profile_model(folder, batch_size=1, seq_len=4).total_flops == \
        profile_model("llama-3.2-1b", batch_size=1, seq_len=4).total_flops
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        load_model_config(str(tmp_path / "no" / "such" / "model"))


@pytest.mark.parametrize("kwargs, param", [
    (dict(batch_size=0), "batch_size"), (dict(seq_len=-1), "seq_len"), (dict(seq_len=2.5), "seq_len"),
    (dict(granularity="layer"), "granularity"), (dict(lora_targets=("wq",)), "lora_targets"),
    (dict(lora_targets=()), "lora_targets"), (dict(lora_rank=0), "lora_rank"), (dict(wire_bytes=0), "wire_bytes"),
])
def test_bad_inputs_raise(llama_cfg, kwargs, param):
    args = dict(batch_size=1, seq_len=8) | kwargs
    with pytest.raises(ValueError, match=param):
        profile_model(llama_cfg, **args)


def test_unsupported_model_type_raises():
    with pytest.raises(ValueError, match="model_type.*'t5'"):
        profile_model("t5-large", batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="model_type"):
        t5_lora_minibatch_memory_bytes("llama-3.2-1b", batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="batch_size"):
        t5_lora_minibatch_memory_bytes("t5-large", batch_size=0, seq_len=8)


def test_t5_memory_estimate():
    from peft import get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = load_model_config("t5-large")
    with torch.device("meta"):
        n_params = sum(p.numel() for p in T5ForConditionalGeneration(cfg).parameters())
    est = t5_lora_minibatch_memory_bytes(cfg, batch_size=4, seq_len=128)
    assert est.weight_bytes == 4 * n_params
    assert est.total_bytes == est.weight_bytes + est.lora_state_bytes + est.activation_bytes
    big = t5_lora_minibatch_memory_bytes(cfg, batch_size=8, seq_len=128)
    assert big.activation_bytes > 1.9 * est.activation_bytes and big.weight_bytes == est.weight_bytes
    small = T5Config(d_model=64, d_ff=256, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=3, vocab_size=100)
    model = get_peft_model(T5ForConditionalGeneration(small), LoraConfig(r=4, target_modules=["q", "v", "wo"]))
    lora = t5_lora_minibatch_memory_bytes(small, batch_size=1, seq_len=8, lora_rank=4, lora_targets=("q", "v", "wo"))
    assert lora.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_t5_activation_estimate_matches_saved_tensors():
    """Korthikanti's per-layer formula against autograd's saved tensors of a 2+2-layer T5 of T5-Large width
    (train mode: dropout 0.1 as in the config, LoRA on q, v). Measured: estimate/saved = 0.99 at s = 64 and
    0.94 at s = 256 (fp32). 15% tolerance: the formula is a published approximation, not an exact count."""
    from peft import get_peft_model
    from transformers import T5ForConditionalGeneration
    cfg = load_model_config("t5-large")
    cfg.num_layers = cfg.num_decoder_layers = 2
    torch.manual_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(cfg), LoraConfig(r=8, target_modules=["q", "v"])).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    saved = _saved_bytes(lambda x: model(input_ids=x, labels=x).loss, ids,
                         exclude={p.untyped_storage().data_ptr() for p in model.parameters()})
    est = t5_lora_minibatch_memory_bytes(cfg, batch_size=2, seq_len=64, lora_targets=("q", "v"))
    assert _rel(est.activation_bytes, saved) < 0.15, (est.activation_bytes, saved)

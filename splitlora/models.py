"""Models and tokenizers for split fine-tuning: an offline default and real checkpoints.

* :func:`byte_tokenizer` builds a byte-level ``PreTrainedTokenizerFast`` offline (256 byte tokens plus
  ``<pad>``, ``<s>``, ``</s>``; vocab 259) with the ``tokenizers`` library: no download, no file.
* :func:`tiny_llama_config` / :func:`llama32_1b_config` give Llama-architecture configs: a small one for
  tests and the CPU default, and the released Llama-3.2-1B architecture (optionally with fewer layers).
* :func:`load_model_and_tokenizer` returns the offline default (random weights, seeded) or, given
  ``model_name_or_path``, a real checkpoint with its own tokenizer (e.g. a local Llama-3.2-1B folder).

Source: docs/split-training.md, "Workload". Nothing is built at import time.
"""
from __future__ import annotations

import torch

from ._validate import check_choice, check_int_range

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# meta-llama/Llama-3.2-1B config.json, https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=128000, eos_token_id=128001,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, high_freq_factor=4.0,
                         low_freq_factor=1.0, original_max_position_embeddings=8192),
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges, built offline: every UTF-8 byte is one token.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``pad_token="<pad>"`` (id 0),
    ``bos_token="<s>"`` (1), ``eos_token="</s>"`` (2), right padding; vocab size 259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="right")


def tiny_llama_config(vocab_size: int = 259, hidden_size: int = 64, num_layers: int = 4,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                      tie_word_embeddings: bool = True, attn_implementation: str = "sdpa",
                      max_position_embeddings: int = 512):
    """A small ``LlamaConfig`` (Llama-3.2 layout: GQA, SiLU MLP, RMSNorm, tied head by default).

    ``intermediate_size`` defaults to 4 x hidden. Raises ValueError for a bad size or attention
    implementation (``"sdpa"`` or ``"eager"``).
    """
    from transformers import LlamaConfig

    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    for name, v in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                    ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        check_int_range(name, v, 1, 10**7)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads!r} is invalid: must divide hidden_size={hidden_size} "
                         f"and be a multiple of num_kv_heads={num_kv_heads}")
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    cfg._attn_implementation = attn_implementation
    return cfg


def llama32_1b_config(num_layers: int | None = None, attn_implementation: str = "sdpa"):
    """The Llama-3.2-1B architecture (16 blocks, H = 2048, vocab 128256, tied head), optionally truncated
    to ``num_layers`` blocks (1..16). Source: the released config.json (link in ``LLAMA32_1B``)."""
    from transformers import LlamaConfig

    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    kw = dict(LLAMA32_1B)
    if num_layers is not None:
        check_int_range("num_layers", num_layers, 1, 16)
        kw["num_hidden_layers"] = int(num_layers)
    cfg = LlamaConfig(use_cache=False, **kw)
    cfg._attn_implementation = attn_implementation
    return cfg


def model_from_config(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``*ForCausalLM`` with random weights drawn under ``torch.manual_seed(seed)``, in ``dtype``,
    in eval mode (no dropout in the base model)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=config._attn_implementation)
    return model.eval()


def load_model_and_tokenizer(model_name_or_path: str | None = None, *, seed: int = 0,
                             dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", **tiny_kwargs):
    """``(model, tokenizer)``: the offline default (``tiny_llama_config(**tiny_kwargs)`` + byte tokenizer)
    when ``model_name_or_path`` is None, else ``AutoModelForCausalLM/AutoTokenizer.from_pretrained`` of it
    (a local folder, or a Hub name when online). The tokenizer gets a pad token (eos) if it lacks one.
    """
    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if model_name_or_path is None:
        cfg = tiny_llama_config(attn_implementation=attn_implementation, **tiny_kwargs)
        return model_from_config(cfg, seed=seed, dtype=dtype), byte_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype,
                                                 attn_implementation=attn_implementation).eval()
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(model_name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok

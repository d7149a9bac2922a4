"""Shared test helpers: synthetic per-cut profiles (independent of splitlora.model.profile) and random instances."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from splitlora.model.hardware import ServerSpec
from splitlora.model.system import CostModel, Workload


def synthetic_profile(rng: np.random.Generator, n_cuts: int | None = None) -> SimpleNamespace:
    """A random but valid per-cut profile: positive unit FLOPs, smashed bytes 0 only at c = L."""
    L = int(n_cuts or rng.integers(2, 40))
    unit = rng.uniform(1e10, 1e12, size=L)
    head = rng.uniform(1e10, 1e12)
    dev = np.r_[0.0, np.cumsum(unit)]
    dev[-1] += head
    total = dev[-1]
    bwd_ratio = rng.uniform(1.0, 2.0)
    smashed = np.r_[np.full(L, rng.uniform(1e5, 1e8)), 0.0]
    mem = rng.uniform(1e8, 1e9) + np.cumsum(np.r_[0.0, rng.uniform(1e7, 5e8, size=L)])
    return SimpleNamespace(n_cuts=L, batch_size=int(rng.integers(1, 9)), seq_len=int(rng.integers(16, 1025)),
                           device_fwd_flops=dev, device_bwd_flops=bwd_ratio * dev,
                           server_fwd_flops=total - dev, server_bwd_flops=bwd_ratio * (total - dev),  # exactly 0 at c = L
                           smashed_bytes=smashed, device_memory_bytes=mem,
                           device_lora_params=np.arange(L + 1) * rng.uniform(1e4, 1e6))


def random_instance(seed: int, k: int = 8, static_power: bool = False, schedule: str = "sequential"):
    """(CostModel, P, R_up, R_down, M, w) drawn at random; w in [0, 1]."""
    rng = np.random.default_rng(seed)
    prof = synthetic_profile(rng)
    f_max = rng.uniform(1e9, 3e9)
    server = ServerSpec.from_datasheet(board="test", cuda_cores=int(rng.integers(1000, 10000)), utilisation=rng.uniform(0.1, 1),
                        f_min_hz=f_max * rng.uniform(0.05, 0.9), f_max_hz=f_max, clock_step_hz=15e6,
                        board_power_w=rng.uniform(50, 500),
                        static_power_w=rng.uniform(0, 50) if static_power else 0.0)
    model = CostModel.from_profile(prof, server, Workload(steps_per_round=int(rng.integers(1, 20)),
                                                          schedule=schedule))
    P = rng.uniform(5e10, 5e12, size=k)
    Ru = rng.uniform(1e6, 2e8, size=k)
    Rd = rng.uniform(1e6, 2e8, size=k)
    M = rng.uniform(0.5, 1.2, size=k) * prof.device_memory_bytes[-1]
    w = float(rng.uniform(0, 1))
    return model, P, Ru, Rd, M, w



V, H, BLOCKS = 97, 32, 3  # the tiny model's vocabulary, width and decoder blocks


def tiny_model(family: str = "llama", tie: bool = True, attn: str = "sdpa", seed: int = 0, **extra):
    """A random tiny causal LM of ``family`` ("llama", "qwen2", "mistral") in fp32, eval mode (no dropout): vocabulary
    V, width H, BLOCKS decoder blocks, 4 heads / 2 KV heads; ``extra`` goes to the config."""
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM)}[family]
    cfg = cfg_cls(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=BLOCKS,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, use_cache=False, **extra)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(cfg).eval()

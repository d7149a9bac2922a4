"""splitlora: energy-efficient split learning of LLMs at the network edge (arXiv 2412.00090), reproduced.

Flat public API. Analytic core: :mod:`profile` (per-cut FLOPs, bytes, memory), :mod:`hardware` (devices,
server, channel), :mod:`system` (delay/energy model), :mod:`card` (CARD, exhaustive search),
:mod:`baselines` (benchmarks), :mod:`experiments` (one function per figure), :mod:`figures` (saving).
Nothing runs at import time; torch and transformers are imported only by the functions that need them.
"""
from .baselines import POLICIES, evaluate_policy, run_policies
from .card import Decision, card, exhaustive_search, optimal_frequency_hz
from .experiments import Scenario
from .figures import save_figure, save_table, save_text
from .hardware import (CHANNEL_STATES, ChannelSpec, DeviceSpec, ServerSpec, load_channel, load_device,
                       load_devices, load_server)
from .profile import ModelProfile, load_model_config, profile_model, t5_lora_minibatch_memory_bytes
from .system import CostModel, Workload, objective

__version__ = "0.1.0"

__all__ = [
    "POLICIES", "evaluate_policy", "run_policies", "Decision", "card", "exhaustive_search", "optimal_frequency_hz",
    "Scenario", "save_figure", "save_table", "save_text", "CHANNEL_STATES", "ChannelSpec", "DeviceSpec",
    "ServerSpec", "load_channel", "load_device", "load_devices", "load_server", "ModelProfile", "load_model_config",
    "profile_model", "t5_lora_minibatch_memory_bytes", "CostModel", "Workload", "objective", "__version__",
]

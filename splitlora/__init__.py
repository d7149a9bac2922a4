"""splitlora: energy-efficient split learning of LLMs at the network edge (arXiv 2412.00090), reproduced.

Flat public API (``import splitlora as sl``):

- analytic core: :mod:`profile` (per-cut FLOPs, bytes, memory), :mod:`hardware` (devices, server, channel),
  :mod:`system` (delay/energy model), :mod:`card` (CARD, exhaustive search), :mod:`baselines` (benchmarks),
  :mod:`experiments` (one function per figure), :mod:`figures` (saving with provenance);
- split fine-tuning: :mod:`split`, :mod:`training`, :mod:`data`, :mod:`models`, :mod:`measure`;
- hardware: :mod:`gpu` (clock control and energy backends), :mod:`calibration`, :mod:`emulation`,
  :mod:`emulated_run`; :mod:`distributed` (torch.distributed roles), :mod:`run_config` (its configuration file),
  :mod:`wire` (tensor messages and the link rate limiter).

Nothing runs at import time. The torch-based names are loaded on first use (module ``__getattr__``), so
``import splitlora`` stays light for the analytic notebooks.
"""
from importlib import import_module

from .baselines import POLICIES, evaluate_policy, run_policies
from .card import Decision, best_clock_hz, card, exhaustive_search, optimal_frequency_hz
from .experiments import Scenario
from .figures import save_figure, save_table, save_text
from .hardware import (CHANNEL_STATES, ChannelSpec, DeviceSpec, ServerSpec, load_channel, load_device,
                       load_devices, load_server)
from .profile import ModelProfile, load_model_config, profile_model, t5_lora_minibatch_memory_bytes
from .system import CostModel, Workload, objective

__version__ = "0.1.0"

_LAZY = {
    "split": ("split_model", "num_units", "split_forward", "to_wire", "SUPPORTED_MODEL_TYPES"),
    "training": ("SplitTrainer", "SplitTrainConfig", "StepLog", "logs_frame", "compare_split_unsplit",
                 "bytes_per_step", "unsplit_training"),
    "models": ("load_model_and_tokenizer", "byte_tokenizer", "tiny_llama_config", "llama32_1b_config",
               "model_from_config", "NAMED_MODELS"),
    "data": ("load_gsm8k", "synthetic_gsm8k", "tokenize_batches", "read_jsonl", "format_prompt"),
    "evaluation": ("SplitLM", "answer_loss", "greedy_generate", "gsm8k_accuracy", "extract_answer", "logits"),
    "measure": ("measure_split_profile", "predicted_vs_measured", "measure_and_predict", "host_matmul_flops_per_s"),
    "gpu": ("get_gpu_backend", "GPUClockBackend", "EmulatedBackend", "GPUBackendError", "GPUNotAvailableError",
            "ClockPermissionError", "ClockControlNotAllowedError", "NotSupportedError", "EnergyMeasurement"),
    "calibration": ("fit_energy_model", "sweep_clocks", "EnergyFit", "ClockSample"),
    "emulation": ("EmulatedDevice", "EmulatedChannel", "ServerClock", "DeviceMemoryError", "kappa_calibration"),
    "emulated_run": ("emulated_training", "emulation_summary"),
    "distributed_report": ("resolve_run_config", "run_distributed_local", "compare_with_in_process",
                           "transfer_accuracy"),
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}


def __getattr__(name):
    """Load a torch-based public name from its module on first use."""
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'splitlora' has no attribute {name!r}")


__all__ = [
    "POLICIES", "evaluate_policy", "run_policies", "Decision", "best_clock_hz", "card", "exhaustive_search",
    "optimal_frequency_hz",
    "Scenario", "save_figure", "save_table", "save_text", "CHANNEL_STATES", "ChannelSpec", "DeviceSpec",
    "ServerSpec", "load_channel", "load_device", "load_devices", "load_server", "ModelProfile", "load_model_config",
    "profile_model", "t5_lora_minibatch_memory_bytes", "CostModel", "Workload", "objective", "__version__",
    *_WHERE,
]

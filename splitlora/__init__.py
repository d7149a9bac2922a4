"""splitlora: energy-efficient split learning of LLMs at the network edge (arXiv 2412.00090), reproduced.

Flat public API (``import splitlora as sl``); the package's rooms (README.md, "Layout"):
``model/`` (numpy-only analytic model and CARD), ``training/`` (split LoRA fine-tuning), ``gpu/`` (clock control and
energy), ``emulation/``, ``distributed/`` (torch.distributed runs), ``experiments/`` (what the notebooks call).

Nothing runs at import time. The torch-based names are loaded on first use (module ``__getattr__``) and listed by
``dir(splitlora)``, so ``import splitlora`` stays light for the analytic notebooks.
"""
from importlib import import_module

from splitlora.errors import SplitLoRAError
from splitlora.experiments.figures import save_figure, save_table, save_text
from splitlora.experiments.parameters import notebook_parameters
from splitlora.model.baselines import POLICIES, evaluate_policy, run_policies
from splitlora.model.card import Decision, best_clock_hz, card, exhaustive_search, optimal_frequency_hz
from splitlora.model.parallel import card_parallel, card_rounds, exhaustive_rounds
from splitlora.model.hardware import (CHANNEL_STATES, ChannelSpec, DeviceSpec, ServerSpec, load_channel, load_device,
                                      load_devices, load_server)
from splitlora.model.profile import ModelProfile, load_model_config, profile_model, t5_lora_minibatch_memory_bytes
from splitlora.model.scenario import Scenario, channel_states
from splitlora.model.system import SCHEDULES, CostModel, Workload, objective

__version__ = "0.1.0"

_LAZY = {
    "training.split": ("split_model", "num_units", "SUPPORTED_MODEL_TYPES"),
    "training.step": ("DeviceHalf", "ServerHalf", "SmashedData", "split_step", "split_forward", "to_wire"),
    "training.trainer": ("SplitTrainer", "SplitTrainConfig", "StepLog", "logs_frame", "unsplit_training"),
    "training.node": ("LoraNode",),
    "training.federated": ("fedavg", "fedavg_payloads", "MODES"),
    "training.models": ("load_model_and_tokenizer", "byte_tokenizer", "tiny_llama_config", "llama32_1b_config",
                        "model_from_config", "NAMED_MODELS"),
    "training.data": ("load_gsm8k", "synthetic_gsm8k", "tokenize_batches", "read_jsonl", "format_prompt"),
    "training.evaluation": ("SplitLM", "answer_loss", "greedy_generate", "gsm8k_accuracy", "extract_answer", "logits"),
    "training.measure": ("measure_split_profile", "predicted_vs_measured", "measure_and_predict",
                         "host_matmul_flops_per_s"),
    "experiments.split_training": ("compare_split_unsplit", "bytes_per_step"),
    "gpu": ("get_gpu_backend", "GPUClockBackend", "EmulatedBackend", "GPUBackendError", "GPUNotAvailableError",
            "ClockPermissionError", "ClockControlNotAllowedError", "NotSupportedError", "EnergyMeasurement"),
    "emulation.calibration": ("fit_energy_model", "sweep_clocks", "EnergyFit", "ClockSample"),
    "emulation.emulators": ("EmulatedDevice", "EmulatedChannel", "ServerClock", "DeviceMemoryError",
                            "kappa_calibration"),
    "emulation.run": ("emulated_training", "emulation_summary"),
    "distributed.config": ("RunConfig", "load_config"),
    "distributed.plan": ("RunPlan", "run_in_process"),
    "distributed.report": ("resolve_run_config", "run_distributed_local", "compare_with_in_process",
                           "transfer_accuracy"),
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}


def __getattr__(name):
    """Load a torch-based public name from its module on first use."""
    if name in _WHERE:
        value = getattr(import_module(f"splitlora.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'splitlora' has no attribute {name!r}")


def __dir__():
    """The eagerly and the lazily loaded public names."""
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "SplitLoRAError", "notebook_parameters", "POLICIES", "evaluate_policy", "run_policies", "Decision", "best_clock_hz", "card",
    "exhaustive_search", "optimal_frequency_hz", "card_parallel", "card_rounds", "exhaustive_rounds", "Scenario", "channel_states", "save_figure", "save_table",
    "save_text", "CHANNEL_STATES", "ChannelSpec", "DeviceSpec", "ServerSpec", "load_channel", "load_device",
    "load_devices", "load_server", "ModelProfile", "load_model_config", "profile_model",
    "t5_lora_minibatch_memory_bytes", "SCHEDULES", "CostModel", "Workload", "objective", "__version__", *_WHERE,
]

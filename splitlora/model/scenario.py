"""The reproduction's scenario: model, workload, devices and channel states in one frozen object.

Source: docs/model.md, "Defaults".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Mapping

import numpy as np

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.hardware import CHANNEL_STATES, PRECISIONS, DeviceSpec, Hardware, load_channel, load_hardware
from splitlora.model.profile import GRANULARITIES, load_model_config, profile_model
from splitlora.model.system import SCHEDULES, CostModel, Workload, check_weight

DEVICE_NAMES = ("Device 1", "Device 2", "Device 3", "Device 4", "Device 5")
@dataclass(frozen=True)
class Scenario:
    """Everything the analytic figures depend on (docs/model.md "Defaults").

    Attributes:
        model: shipped model name or config path ("llama-3.2-1b").
        granularity: "block" (L = 16 for Llama-3.2-1B) or "sublayer" (L = 32, the paper's count).
        batch_size: B sequences per mini-batch; seq_len: s tokens per sequence.
        lora_rank: r; param_bytes / wire_bytes: bytes per frozen weight / per smashed-data element.
        steps_per_round: I mini-batches per device per round.
        w: weight of delay against server energy, in [0, 1].
        discrete_clocks: CARD picks the server clock from the supported-clock table (True) or [f_min, f_max].
        devices: device profile keys ("Device 5") or boards ("Jetson Nano 4GB") of data/hardware.yaml (and of
            ``hardware``), served one after another each round; stored as profile keys.
        compute_scale: multiplies every device's clock (sensitivity), > 0.
        schedule: "sequential" (the paper, as reconstructed), "pipelined", "parallel" or "parallel-pipelined"
            (docs/model.md "Schedules").
        precision: arithmetic of the devices' training, "fp32" (FP32 CUDA-core peak, the default), "fp16" or "bf16"
            (tensor-core peaks where the board has them; docs/model.md "Compute").
        server: server profile key or board (None: the file's default_server, the paper's RTX 4060 Ti).
        hardware: path of the user's hardware YAML merged over the shipped profiles (docs/model.md "Your own
            hardware"), or None.
    Raises:
        ValueError: any field out of range, naming it.
    """

    model: str = "llama-3.2-1b"
    granularity: str = "sublayer"
    batch_size: int = 4
    seq_len: int = 512
    lora_rank: int = 8
    param_bytes: int = 2
    wire_bytes: int = 2
    steps_per_round: int = 10
    w: float = 0.1
    discrete_clocks: bool = True
    devices: tuple = DEVICE_NAMES
    compute_scale: float = 1.0
    schedule: str = "sequential"
    precision: str = "fp32"
    server: str | None = None
    hardware: str | None = None

    def __post_init__(self):
        V.check_choice("granularity", self.granularity, GRANULARITIES)
        V.check_int_range("batch_size", self.batch_size, 1, 1 << 20)
        V.check_int_range("seq_len", self.seq_len, 1, 1 << 24)
        V.check_int_range("lora_rank", self.lora_rank, 1, 1 << 16)
        V.check_choice("param_bytes", self.param_bytes, (1, 2, 4))
        V.check_choice("wire_bytes", self.wire_bytes, (1, 2, 4))
        V.check_int_range("steps_per_round", self.steps_per_round, 1, 1 << 20)
        check_weight(self.w)
        V.check_positive("compute_scale", self.compute_scale)
        V.check_choice("schedule", self.schedule, SCHEDULES)
        V.check_choice("precision", self.precision, PRECISIONS)
        if isinstance(self.devices, (str, bytes)):
            raise InvalidParameterError(f"devices={self.devices!r} is invalid: must be a list of device names, e.g. "
                                        f"[{self.devices!r}]")
        if not all(isinstance(d, str) for d in self.devices):
            raise InvalidParameterError(f"devices={self.devices!r} is invalid: must be a list of device names")
        if self.hardware is not None:
            object.__setattr__(self, "hardware", str(self.hardware))
        hw = self.hardware_profiles()
        object.__setattr__(self, "devices", tuple(hw.device_key(d, "devices") for d in self.devices))
        for d in self.devices:  # a profile without a throughput for this precision fails here, not later
            hw.devices[d].sustained_flops_per_s(self.precision)
        if not self.devices:
            raise InvalidParameterError("devices=() is invalid: must name at least one of " + str(list(hw.devices)))
        hw.server(self.server)

    @classmethod
    def from_parameters(cls, parameters: Mapping) -> "Scenario":
        """The scenario of a notebook's parameters: the entries of ``parameters`` (e.g. ``globals()``) named like a
        field of :class:`Scenario`; the others are ignored. Raises ValueError for a value out of range."""
        return cls(**{f.name: parameters[f.name] for f in fields(cls) if f.name in parameters})

    def profile(self):
        """The :class:`splitlora.model.profile.ModelProfile` of this scenario (cached)."""
        return _profile(self.model, self.granularity, self.batch_size, self.seq_len, self.lora_rank,
                        self.param_bytes, self.wire_bytes)

    def hardware_profiles(self) -> Hardware:
        """The shipped hardware profiles with ``hardware`` merged over them (cached per file version)."""
        return load_hardware(self.hardware)

    def device_specs(self) -> dict[str, DeviceSpec]:
        """{profile key: DeviceSpec} of the scenario's devices, in order (before ``compute_scale``)."""
        hw = self.hardware_profiles()
        return {name: hw.device(name) for name in self.devices}

    def cost_model(self) -> CostModel:
        """The :class:`CostModel` of this scenario on its server (default: the paper's RTX 4060 Ti)."""
        return CostModel.from_profile(self.profile(), self.hardware_profiles().server(self.server),
                                      Workload(self.steps_per_round, schedule=self.schedule))

    def device_arrays(self, names=None):
        """(P_d FLOP/s at the scenario's precision, M_d byte) arrays of shape (M,) for the scenario's devices (or
        ``names``: keys or boards)."""
        hw = self.hardware_profiles()
        ds = [hw.device(n).scaled(self.compute_scale) for n in (names or self.devices)]
        return (np.array([d.sustained_flops_per_s(self.precision) for d in ds]),
                np.array([d.training_memory_bytes for d in ds]))

    def parameters(self) -> dict:
        """The fields as a JSON-serialisable dict (for provenance)."""
        out = asdict(self)
        out["devices"] = list(self.devices)
        return out


@lru_cache(maxsize=32)
def _profile(model, granularity, B, s, r, pb, wb):
    return profile_model(load_model_config(model), batch_size=B, seq_len=s, granularity=granularity,
                         lora_rank=r, param_bytes=pb, wire_bytes=wb)


def channel_states(condition: str, rounds: int, num_devices: int, seed: int = 0) -> np.ndarray:
    """State indices (N, M): a fixed state ("Good", "Normal", "Poor") or "Markov" (seeded chain, stationary start).

    Raises: ValueError for an unknown condition.
    """
    V.check_choice("condition", condition, CHANNEL_STATES + ("Markov",))
    if condition == "Markov":
        return load_channel().simulate(rounds, num_devices, seed=seed)
    return np.full((rounds, num_devices), CHANNEL_STATES.index(condition))



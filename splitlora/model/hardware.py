"""Hardware and channel parameters, loaded from ``data/hardware.yaml`` and ``data/channel.yaml``.

Every number in those files carries its unit and its source (a datasheet URL, or "assumption" with the
reason); docs/model.md "Hardware" and "Channel" explain them. This module only turns them into frozen
dataclasses with SI units (Hz, byte, W, bit/s) and derives the server's effective switched capacitance
kappa = board power / f_max^3 (docs/model.md "Server energy").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.paths import DATA_DIR

CHANNEL_STATES = ("Good", "Normal", "Poor")
#: Arithmetic precisions of the device-side workload (docs/model.md "Compute").
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DeviceSpec:
    """An edge device (Jetson board).

    Attributes:
        name: "Device 1".."Device 5" in the paper's order (strongest to weakest).
        board: product name, e.g. "Jetson Nano 4GB".
        cuda_cores: GPU CUDA cores (-).
        gpu_max_clock_hz: maximum GPU clock f_d (Hz).
        utilisation: sustained fraction eta_d of peak FLOP/s (-).
        memory_bytes: total (CPU/GPU shared) memory (byte).
        memory_reserve_bytes: part of it held by the OS and CUDA runtime (byte).
        fp16_peak_flops: dense FP16 peak at f_d (FLOP/s): tensor cores (Volta, Ampere) or double-rate FP16 CUDA
            cores (Maxwell, Pascal); 0 if unknown.
        bf16_supported: whether the GPU has BF16 units (Ampere tensor cores); without them bf16 runs at the fp32 peak.
    Source: data/hardware.yaml (datasheet URLs there), docs/model.md "Compute".
    """

    name: str
    board: str
    cuda_cores: int
    gpu_max_clock_hz: float
    utilisation: float
    memory_bytes: float
    memory_reserve_bytes: float
    fp16_peak_flops: float = 0.0
    bf16_supported: bool = False

    @property
    def flops_per_cycle(self) -> float:
        """g_d = 2 x CUDA cores (FLOP/cycle): one fused multiply-add per core per cycle."""
        return 2.0 * self.cuda_cores

    @property
    def flops_per_s(self) -> float:
        """Sustained compute P_d = eta_d g_d f_d (FLOP/s), docs/model.md "Compute"."""
        return self.utilisation * self.flops_per_cycle * self.gpu_max_clock_hz

    def peak_flops(self, precision: str = "fp32") -> float:
        """Peak FLOP/s for ``precision`` in :data:`PRECISIONS` (docs/model.md "Compute"): fp32 g_d f_d; fp16 the
        FP16 peak; bf16 the FP16 peak where the GPU has BF16 units, else the fp32 peak.

        Raises: InvalidParameterError for an unknown precision, or fp16/bf16 without a known FP16 peak.
        """
        V.check_choice("precision", precision, PRECISIONS)
        fp32 = self.flops_per_cycle * self.gpu_max_clock_hz
        if precision == "fp32" or (precision == "bf16" and not self.bf16_supported):
            return fp32
        if self.fp16_peak_flops <= 0:
            raise InvalidParameterError(f"precision={precision!r} is invalid for {self.board}: no fp16_peak_flops in "
                                        "data/hardware.yaml (use 'fp32')")
        return self.fp16_peak_flops

    def sustained_flops_per_s(self, precision: str = "fp32") -> float:
        """P_d = eta_d x :meth:`peak_flops` (FLOP/s); ``flops_per_s`` is the fp32 case."""
        return self.utilisation * self.peak_flops(precision)

    @property
    def training_memory_bytes(self) -> float:
        """M_d = memory - reserve: bytes available for training (byte)."""
        return self.memory_bytes - self.memory_reserve_bytes

    def scaled(self, compute_scale: float) -> "DeviceSpec":
        """A copy whose GPU clock (hence FLOP/s) is multiplied by ``compute_scale`` (> 0); for sensitivity sweeps.

        Raises:
            ValueError: compute_scale not finite and > 0.
        """
        V.check_positive("compute_scale", compute_scale)
        return DeviceSpec(self.name, self.board, self.cuda_cores, self.gpu_max_clock_hz * compute_scale,
                          self.utilisation, self.memory_bytes, self.memory_reserve_bytes,
                          self.fp16_peak_flops * compute_scale, self.bf16_supported)


@dataclass(frozen=True)
class ServerSpec:
    """The edge server's GPU (RTX 4060 Ti 16GB in the paper).

    Attributes:
        board: product name.
        cuda_cores: CUDA cores (-).
        utilisation: eta_s (-).
        f_min_hz, f_max_hz: lowest and highest GPU clock CARD may choose (Hz).
        clock_step_hz: spacing of the supported-clock table (Hz).
        board_power_w: total graphics power at f_max (W).
        static_power_w: P0, power drawn while computing independent of f (W); 0 in the default model.
    Source: data/hardware.yaml; kappa derivation in docs/model.md "Server energy".
    """

    board: str
    cuda_cores: int
    utilisation: float
    f_min_hz: float
    f_max_hz: float
    clock_step_hz: float
    board_power_w: float
    static_power_w: float = 0.0

    def __post_init__(self):
        V.check_positive("f_min_hz", self.f_min_hz)
        V.check_positive("f_max_hz", self.f_max_hz)
        V.check_order("f_min_hz", self.f_min_hz, "f_max_hz", self.f_max_hz)
        V.check_positive("board_power_w", self.board_power_w)
        V.check_positive("static_power_w", self.static_power_w, allow_zero=True)
        V.check_range("utilisation", self.utilisation, 1e-6, 1.0)
        V.check_positive("clock_step_hz", self.clock_step_hz)

    @property
    def flops_per_cycle(self) -> float:
        """g_s = 2 x CUDA cores (FLOP/cycle)."""
        return 2.0 * self.cuda_cores

    @property
    def kappa(self) -> float:
        """Effective switched capacitance (W/Hz^3): board power / f_max^3, so that kappa f_max^3 = board power."""
        return self.board_power_w / self.f_max_hz ** 3

    def supported_clocks_hz(self) -> np.ndarray:
        """The discrete clock table f_min, f_min + step, ..., up to and including f_max (Hz), shape (K,)."""
        n = int(np.floor((self.f_max_hz - self.f_min_hz) / self.clock_step_hz + 1e-9))
        clocks = self.f_min_hz + self.clock_step_hz * np.arange(n + 1)
        if clocks[-1] < self.f_max_hz:
            clocks = np.append(clocks, self.f_max_hz)
        return clocks


@dataclass(frozen=True)
class ChannelSpec:
    """The device-server wireless link: rate per state and the Markov chain of states.

    Attributes:
        bandwidth_hz: W (Hz).
        snr_db: SNR per state (dB), dict keyed by "Good"/"Normal"/"Poor".
        transition: 3x3 row-stochastic matrix, rows/columns in CHANNEL_STATES order.
    Source: data/channel.yaml; docs/model.md "Channel".
    """

    bandwidth_hz: float
    snr_db: dict = field(default_factory=dict)
    transition: tuple = ()

    def __post_init__(self):
        V.check_positive("bandwidth_hz", self.bandwidth_hz)
        for s in CHANNEL_STATES:
            if s not in self.snr_db:
                raise InvalidParameterError(f"snr_db is missing state {s!r}: must give one of each of {list(CHANNEL_STATES)}")
            V.check_finite(f"snr_db[{s!r}]", self.snr_db[s])
        P = np.asarray(self.transition, dtype=float)
        if P.shape != (3, 3) or not np.all(np.isfinite(P)) or np.any(P < 0) or not np.allclose(P.sum(1), 1.0):
            raise InvalidParameterError(f"transition={self.transition!r} is invalid: must be a 3x3 row-stochastic matrix")

    def rate_bps(self, state: str) -> float:
        """Shannon rate R = W log2(1 + SNR) of a state (bit/s). Raises ValueError for an unknown state."""
        V.check_choice("channel state", state, CHANNEL_STATES)
        return float(self.bandwidth_hz * np.log2(1.0 + 10.0 ** (self.snr_db[state] / 10.0)))

    def rates_bps(self) -> np.ndarray:
        """Rates of (Good, Normal, Poor), shape (3,), bit/s."""
        return np.array([self.rate_bps(s) for s in CHANNEL_STATES])

    def simulate(self, rounds: int, num_devices: int, *, seed: int = 0, initial: str | None = None) -> np.ndarray:
        """Sample state indices (0=Good, 1=Normal, 2=Poor) of independent per-device chains.

        Args:
            rounds: N >= 1 rounds; num_devices: M >= 1 devices; seed: numpy seed;
            initial: start state for every device, or None to draw it from the stationary distribution.
        Returns:
            int array of shape (N, M).
        Raises:
            ValueError: rounds or num_devices < 1, unknown initial state.
        """
        V.check_int_range("rounds", rounds, 1, 10**9)
        V.check_int_range("num_devices", num_devices, 1, 10**9)
        rng = np.random.default_rng(seed)
        P = np.asarray(self.transition, dtype=float)
        cum = np.cumsum(P, axis=1)
        out = np.empty((rounds, num_devices), dtype=np.int64)
        if initial is None:
            out[0] = rng.choice(3, size=num_devices, p=self.stationary())
        else:
            V.check_choice("initial", initial, CHANNEL_STATES)
            out[0] = CHANNEL_STATES.index(initial)
        for n in range(1, rounds):
            u = rng.random(num_devices)
            out[n] = np.minimum((u[:, None] > cum[out[n - 1]]).sum(1), 2)
        return out

    def stationary(self) -> np.ndarray:
        """Stationary distribution pi (pi P = pi), shape (3,), from the left eigenvector of eigenvalue 1."""
        P = np.asarray(self.transition, dtype=float)
        vals, vecs = np.linalg.eig(P.T)
        v = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
        return v / v.sum()


@lru_cache(maxsize=16)
def _parse_yaml(path: str, mtime_ns: int, size: int) -> dict:
    return yaml.safe_load(Path(path).read_text())


def read_yaml(path) -> dict:
    """``yaml.safe_load`` of ``path``, parsed once per file version (cached by path, modification time and size)."""
    st = Path(path).stat()
    return _parse_yaml(str(path), st.st_mtime_ns, st.st_size)


def _v(entry):
    return entry["value"] if isinstance(entry, dict) else entry


def load_devices(path: Path | None = None) -> dict[str, DeviceSpec]:
    """Device 1..5 from ``data/hardware.yaml`` (or ``path``), keyed by name, in file order."""
    raw = read_yaml(path or DATA_DIR / "hardware.yaml")
    eta = float(_v(raw["utilisation"]["device"]))
    return {
        name: DeviceSpec(name=name, board=str(_v(d["board"])), cuda_cores=int(_v(d["cuda_cores"])),
                         gpu_max_clock_hz=float(_v(d["gpu_max_clock_hz"])), utilisation=eta,
                         memory_bytes=float(_v(d["memory_bytes"])),
                         memory_reserve_bytes=float(_v(d["memory_reserve_bytes"])),
                         fp16_peak_flops=float(_v(d.get("fp16_peak_flops", 0.0))),
                         bf16_supported=bool(_v(d.get("bf16_supported", False))))
        for name, d in raw["devices"].items()
    }


def load_device(name: str, path: Path | None = None) -> DeviceSpec:
    """One device by name ("Device 1".."Device 5") or board ("Jetson Nano 4GB").

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    devices = load_devices(path)
    for d in devices.values():
        if name in (d.name, d.board):
            return d
    raise InvalidParameterError(f"device={name!r} is invalid: must be one of {list(devices)} "
                     f"or {[d.board for d in devices.values()]}")


def load_server(path: Path | None = None) -> ServerSpec:
    """The edge server from ``data/hardware.yaml`` (or ``path``)."""
    raw = read_yaml(path or DATA_DIR / "hardware.yaml")
    s = raw["server"]
    return ServerSpec(board=str(_v(s["board"])), cuda_cores=int(_v(s["cuda_cores"])),
                      utilisation=float(_v(raw["utilisation"]["server"])),
                      f_min_hz=float(_v(s["gpu_min_clock_hz"])), f_max_hz=float(_v(s["gpu_max_clock_hz"])),
                      clock_step_hz=float(_v(s["gpu_clock_step_hz"])), board_power_w=float(_v(s["board_power_w"])),
                      static_power_w=float(_v(s["static_power_w"])))


def load_channel(path: Path | None = None) -> ChannelSpec:
    """The channel model from ``data/channel.yaml`` (or ``path``)."""
    raw = read_yaml(path or DATA_DIR / "channel.yaml")
    return ChannelSpec(bandwidth_hz=float(_v(raw["bandwidth_hz"])),
                       snr_db={k: float(_v(v)) for k, v in raw["snr_db"].items()},
                       transition=tuple(tuple(r) for r in _v(raw["transition"])))

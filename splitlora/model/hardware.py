"""Hardware and channel parameters, loaded from ``data/hardware.yaml`` and ``data/channel.yaml``.

Every number in those files carries its unit and its source (a datasheet URL, or "assumption" with the
reason); docs/model.md "Hardware" and "Channel" explain them. This module only turns them into frozen
dataclasses with SI units (Hz, byte, W, bit/s) and derives the server's effective switched capacitance
kappa = board power / f_max^3 (docs/model.md "Server energy").
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
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


def kappa_from_power(power_w: float, clock_hz: float) -> float:
    """kappa = P / f^3 (W/Hz^3): the effective switched capacitance when all of ``power_w`` (W) is dynamic power at
    ``clock_hz`` (Hz) (docs/model.md "Server energy"; with the board power at f_max, an upper bound)."""
    return float(power_w) / float(clock_hz) ** 3


def check_cuda_cores(name: str, cores, lo: int = 1) -> int:
    """``cores`` as an int in [lo, 10^7]; raises InvalidParameterError naming ``name`` otherwise (2048.5, True)."""
    if isinstance(cores, bool) or not isinstance(cores, (int, np.integer)) or not lo <= cores <= 10**7:
        raise InvalidParameterError(f"{name}={cores!r} is invalid: must be an integer in [{lo}, 10000000]")
    return int(cores)


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
        given_flops_per_s: measured or vendor-stated sustained FLOP/s as ((precision or "any", FLOP/s), ...); when
            given it is P_d and the datasheet numbers are not used (a phone, an NPU).
    Source: data/hardware.yaml (datasheet URLs there), docs/model.md "Compute" and "Your own hardware".
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
    given_flops_per_s: tuple = ()

    def __post_init__(self):
        where = f"devices[{self.name!r}]"
        check_cuda_cores(f"{where}.cuda_cores", self.cuda_cores, lo=0)
        V.check_range(f"{where}.utilisation", self.utilisation, 1e-6, 1.0)
        V.check_positive(f"{where}.memory_bytes", self.memory_bytes)
        V.check_range(f"{where}.memory_reserve_bytes", self.memory_reserve_bytes, 0.0, self.memory_bytes * (1 - 1e-9))
        V.check_positive(f"{where}.fp16_peak_flops", self.fp16_peak_flops, allow_zero=True)
        if not isinstance(self.bf16_supported, (bool, np.bool_)):
            raise InvalidParameterError(f"{where}.bf16_supported={self.bf16_supported!r} is invalid: must be a YAML "
                                        "boolean, true or false (unquoted)")

    @property
    def flops_per_cycle(self) -> float:
        """g_d = 2 x CUDA cores (FLOP/cycle): one fused multiply-add per core per cycle."""
        return 2.0 * self.cuda_cores

    @property
    def flops_per_s(self) -> float:
        """Sustained fp32 compute P_d (FLOP/s): :meth:`sustained_flops_per_s` of "fp32"."""
        return self.sustained_flops_per_s("fp32")

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
        """P_d = eta_d x :meth:`peak_flops` (FLOP/s), or the given sustained FLOP/s of ``precision`` (or of "any")
        where the profile states it; ``flops_per_s`` is the fp32 case.

        Raises: InvalidParameterError for a precision the profile gives no number for.
        """
        V.check_choice("precision", precision, PRECISIONS)
        given = dict(self.given_flops_per_s)
        if given:
            if precision not in given and "any" not in given:
                raise InvalidParameterError(f"precision={precision!r} is invalid for {self.board}: its flops_per_s "
                                            f"gives only {sorted(given)}")
            return given.get(precision, given.get("any"))
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
        return replace(self, gpu_max_clock_hz=self.gpu_max_clock_hz * compute_scale,
                       fp16_peak_flops=self.fp16_peak_flops * compute_scale,
                       given_flops_per_s=tuple((k, v * compute_scale) for k, v in self.given_flops_per_s))


@dataclass(frozen=True)
class ServerSpec:
    """The edge server's GPU (RTX 4060 Ti 16GB in the paper), as the delay/energy model sees it.

    Attributes:
        board: product name.
        flops_per_cycle: g_s, peak FLOP per clock cycle (2 x CUDA cores for FP32 CUDA cores) (FLOP/cycle).
        utilisation: eta_s, sustained fraction of peak (-).
        clocks_hz: the supported-clock table CARD picks from, ascending (Hz), shape (K_f,).
        kappa: effective switched capacitance, dynamic power kappa f^3 (W/Hz^3).
        static_power_w: P0, power drawn while computing independent of f (W); 0 in the default model.
        memory_bytes: GPU memory (byte).
    Raises:
        InvalidParameterError: a value out of range (non-positive clocks, g_s, kappa; unsorted clock table).
    Source: data/hardware.yaml; docs/model.md "Server energy" and "Your own hardware".
    """

    board: str
    flops_per_cycle: float
    utilisation: float
    clocks_hz: tuple
    kappa: float
    static_power_w: float = 0.0
    memory_bytes: float = float("inf")

    def __post_init__(self):
        object.__setattr__(self, "clocks_hz", tuple(float(f) for f in np.atleast_1d(self.clocks_hz)))
        V.check_positive("clocks_hz", self.clocks_hz)
        if list(self.clocks_hz) != sorted(set(self.clocks_hz)):
            raise InvalidParameterError(f"clocks_hz={list(self.clocks_hz)!r} is invalid: must be strictly ascending")
        V.check_positive("flops_per_cycle", self.flops_per_cycle)
        V.check_positive("kappa", self.kappa)
        V.check_positive("static_power_w", self.static_power_w, allow_zero=True)
        V.check_range("utilisation", self.utilisation, 1e-6, 1.0)
        V.check_positive("memory_bytes", min(self.memory_bytes, 1e300))

    @classmethod
    def from_datasheet(cls, board: str, cuda_cores: int, utilisation: float, f_min_hz: float, f_max_hz: float,
                       clock_step_hz: float, board_power_w: float, static_power_w: float = 0.0,
                       memory_bytes: float = float("inf")) -> "ServerSpec":
        """From datasheet numbers: g_s = 2 x CUDA cores, the clock table f_min..f_max every ``clock_step_hz`` and
        kappa = board power / f_max^3 (all board power dynamic at f_max, an upper bound; docs/model.md "Server
        energy"). Raises InvalidParameterError for a value out of range."""
        cuda_cores = check_cuda_cores("cuda_cores", cuda_cores)
        V.check_positive("board_power_w", board_power_w)
        clocks = clock_table_hz(f_min_hz, f_max_hz, clock_step_hz)
        return cls(board=board, flops_per_cycle=2.0 * cuda_cores, utilisation=utilisation, clocks_hz=clocks,
                   kappa=kappa_from_power(board_power_w, clocks[-1]), static_power_w=static_power_w,
                   memory_bytes=memory_bytes)

    @property
    def f_min_hz(self) -> float:
        """Lowest supported clock (Hz)."""
        return self.clocks_hz[0]

    @property
    def f_max_hz(self) -> float:
        """Highest supported clock (Hz)."""
        return self.clocks_hz[-1]

    @property
    def clock_step_hz(self) -> float:
        """Smallest spacing of the clock table (Hz); f_max for a single-clock table."""
        return float(np.diff(self.clocks_hz).min()) if len(self.clocks_hz) > 1 else self.f_max_hz

    @property
    def board_power_w(self) -> float:
        """Dynamic power at f_max, kappa f_max^3 (W)."""
        return self.kappa * self.f_max_hz ** 3

    def supported_clocks_hz(self) -> np.ndarray:
        """The clock table (Hz), shape (K_f,)."""
        return np.array(self.clocks_hz)


def clock_table_hz(f_min_hz: float, f_max_hz: float, step_hz: float) -> np.ndarray:
    """f_min, f_min + step, ..., up to and including f_max (Hz): NVML's supported-clock table from its range."""
    V.check_positive("f_min_hz", f_min_hz)
    V.check_positive("clock_step_hz", step_hz)
    V.check_order("f_min_hz", f_min_hz, "f_max_hz", f_max_hz)
    n = int(np.floor((f_max_hz - f_min_hz) / step_hz + 1e-9))
    clocks = f_min_hz + step_hz * np.arange(n + 1)
    if clocks[-1] < f_max_hz:
        clocks = np.append(clocks, f_max_hz)
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
        return float(shannon_rate_bps(self.bandwidth_hz, self.snr_db[state]))

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


def shannon_rate_bps(bandwidth_hz, snr_db):
    """Shannon capacity R = W log2(1 + 10^(SNR/10)) (bit/s) of bandwidth W (Hz) at SNR (dB), broadcasting; the one
    place the link-rate formula is written (docs/model.md "Channel")."""
    return bandwidth_hz * np.log2(1.0 + 10.0 ** (np.asarray(snr_db, dtype=float) / 10.0))


@lru_cache(maxsize=16)
def _parse_yaml(path: str, mtime_ns: int, size: int) -> dict:
    return yaml.safe_load(Path(path).read_text())


def read_yaml(path) -> dict:
    """``yaml.safe_load`` of ``path``, parsed once per file version (cached by path, modification time and size)."""
    st = Path(path).stat()
    return _parse_yaml(str(path), st.st_mtime_ns, st.st_size)


def _v(entry):
    return entry["value"] if isinstance(entry, dict) and "value" in entry else entry


SHIPPED_HARDWARE = DATA_DIR / "hardware.yaml"
_DEVICE_KEYS = {"board", "cuda_cores", "gpu_max_clock_hz", "utilisation", "memory_bytes", "memory_reserve_bytes",
                "flops_per_s",
                "fp16_peak_flops", "bf16_supported"}
_SERVER_KEYS = {"board", "cuda_cores", "flops_per_cycle", "gpu_min_clock_hz", "gpu_max_clock_hz", "gpu_clock_step_hz",
                "clocks_hz", "board_power_w", "kappa", "measured_power_w", "measured_clock_hz", "static_power_w",
                "memory_bytes", "utilisation"}


#: Fields that give the same quantity in different ways: a user entry naming one replaces the others of a shipped entry.
_ALTERNATIVES = ({"kappa", "board_power_w", "measured_power_w", "measured_clock_hz"},
                 {"clocks_hz", "gpu_min_clock_hz", "gpu_clock_step_hz"},
                 {"flops_per_cycle", "cuda_cores"}, {"flops_per_s", "fp16_peak_flops", "bf16_supported"})


@dataclass(frozen=True)
class Hardware:
    """The devices and servers a scenario may use: the shipped profiles with a user's file merged over them.

    Attributes:
        devices: {profile key: DeviceSpec}, in file order ("Device 1".."Device 5", then the user's).
        servers: {profile key: ServerSpec}; default_server: the key used when none is named.
        source: the user file merged over ``data/hardware.yaml``, or None.
    Source: docs/model.md "Your own hardware".
    """

    devices: dict
    servers: dict
    default_server: str
    source: str | None = None

    @staticmethod
    def _find(kind: str, name, table: dict):
        if isinstance(name, str):
            if name in table:
                return name
            for key, spec in table.items():
                if spec.board == name:
                    return key
        raise InvalidParameterError(f"{kind}={name!r} is invalid: must be one of {list(table)} "
                                    f"or {[d.board for d in table.values()]}")

    def device_key(self, name: str, parameter: str = "device") -> str:
        """The profile key of a device given by key ("Device 5") or board ("Jetson Nano 4GB"); raises
        InvalidParameterError naming ``parameter`` and listing both."""
        return self._find(parameter, name, self.devices)

    def device(self, name: str) -> DeviceSpec:
        """A device by profile key or board name (InvalidParameterError if unknown)."""
        return self.devices[self.device_key(name)]

    def server(self, name: str | None = None, parameter: str = "server") -> ServerSpec:
        """A server by profile key or board name; the default server for None (InvalidParameterError if unknown)."""
        return self.servers[self._find(parameter, self.default_server if name is None else name, self.servers)]


def _number(where: str, entry: dict, key: str, *, positive=True, allow_zero=False):
    value = _v(entry[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(f"{where}.{key}={value!r} is invalid: must be a number")
    if positive:
        V.check_positive(f"{where}.{key}", value, allow_zero=allow_zero)
    return float(value)


def _check_keys(where: str, entry, allowed: set):
    if not isinstance(entry, dict):
        raise InvalidParameterError(f"{where}={entry!r} is invalid: must be a mapping of fields")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise InvalidParameterError(f"{where} has unknown fields {unknown}: must be among {sorted(allowed)}")


def _require(where: str, entry: dict, *alternatives):
    for keys in alternatives:
        if all(k in entry for k in keys):
            return keys
    raise InvalidParameterError(f"{where} is incomplete: must give " + " or ".join("+".join(k) for k in alternatives))


def _device(where: str, name: str, d: dict, eta: float) -> DeviceSpec:
    _check_keys(where, d, _DEVICE_KEYS)
    _require(where, d, ("memory_bytes",))
    _require(where, d, ("flops_per_s",), ("cuda_cores", "gpu_max_clock_hz"))
    has = lambda k: k in d  # noqa: E731
    given = ()
    if has("flops_per_s"):
        raw = d["flops_per_s"]
        if isinstance(raw, dict) and "value" not in raw:  # per precision: {fp32: ..., fp16: ...}
            bad = sorted(set(raw) - set(PRECISIONS))
            if bad or not raw:
                raise InvalidParameterError(f"{where}.flops_per_s has precisions {bad or '{}'}: must be among "
                                            f"{list(PRECISIONS)}")
            given = tuple((k, _number(f"{where}.flops_per_s", raw, k)) for k in raw)
        else:
            given = (("any", _number(where, d, "flops_per_s")),)
    return DeviceSpec(
        name=name, board=str(_v(d.get("board", name))),
        cuda_cores=_v(d["cuda_cores"]) if has("cuda_cores") else 0,
        gpu_max_clock_hz=_number(where, d, "gpu_max_clock_hz") if has("gpu_max_clock_hz") else 0.0,
        utilisation=_number(where, d, "utilisation") if has("utilisation") else eta,
        memory_bytes=_number(where, d, "memory_bytes"),
        memory_reserve_bytes=_number(where, d, "memory_reserve_bytes", allow_zero=True) if has("memory_reserve_bytes")
        else 0.0,
        fp16_peak_flops=_number(where, d, "fp16_peak_flops", allow_zero=True) if has("fp16_peak_flops") else 0.0,
        bf16_supported=_v(d.get("bf16_supported", False)), given_flops_per_s=given)


def _server(where: str, s: dict, eta: float) -> ServerSpec:
    _check_keys(where, s, _SERVER_KEYS)
    if "clocks_hz" in s:
        clocks = _v(s["clocks_hz"])
        if not isinstance(clocks, list) or not clocks:
            raise InvalidParameterError(f"{where}.clocks_hz={clocks!r} is invalid: must be a non-empty list of Hz")
        clocks = np.array(sorted(float(f) for f in clocks))
        V.check_positive(f"{where}.clocks_hz", clocks)
    else:
        _require(where, s, ("clocks_hz",), ("gpu_min_clock_hz", "gpu_max_clock_hz", "gpu_clock_step_hz"))
        clocks = clock_table_hz(_number(where, s, "gpu_min_clock_hz"), _number(where, s, "gpu_max_clock_hz"),
                                _number(where, s, "gpu_clock_step_hz"))
    g = ("flops_per_cycle",) == _require(where, s, ("flops_per_cycle",), ("cuda_cores",))
    power = _require(where, s, ("kappa",), ("board_power_w",), ("measured_power_w", "measured_clock_hz"))
    if power == ("kappa",):
        kappa = _number(where, s, "kappa")
    elif power == ("board_power_w",):
        kappa = kappa_from_power(_number(where, s, "board_power_w"), clocks[-1])
    else:
        kappa = kappa_from_power(_number(where, s, "measured_power_w"), _number(where, s, "measured_clock_hz"))
    return ServerSpec(board=str(_v(s.get("board", where))),
                      flops_per_cycle=_number(where, s, "flops_per_cycle") if g
                      else 2.0 * check_cuda_cores(f"{where}.cuda_cores", _v(s["cuda_cores"])),
                      utilisation=_number(where, s, "utilisation") if "utilisation" in s else eta, clocks_hz=clocks,
                      kappa=kappa, static_power_w=_number(where, s, "static_power_w", allow_zero=True)
                      if "static_power_w" in s else 0.0,
                      memory_bytes=_number(where, s, "memory_bytes") if "memory_bytes" in s else float("inf"))


def _merge(base: dict, user: dict, where: str) -> dict:
    if not isinstance(user, dict):
        raise InvalidParameterError(f"hardware={where!r} is invalid: must be a YAML mapping with devices/servers")
    unknown = sorted(set(user) - {"utilisation", "devices", "servers", "default_server"})
    if unknown:
        raise InvalidParameterError(f"hardware={where!r} has unknown sections {unknown}: must be among "
                                    "['default_server', 'devices', 'servers', 'utilisation']")
    out = dict(base)
    for section in ("utilisation", "devices", "servers"):
        if section in user:
            merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.get(section, {}).items()}
            if not isinstance(user[section], dict):
                raise InvalidParameterError(f"{where}: {section}={user[section]!r} is invalid: must be a mapping")
            for key, entry in user[section].items():
                if isinstance(entry, dict) and isinstance(merged.get(key), dict) and "value" not in entry:
                    base_entry = dict(merged[key])
                    for group in _ALTERNATIVES:  # a user's kappa replaces the shipped board power, and so on
                        if set(entry) & group:
                            for k in group - set(entry):
                                base_entry.pop(k, None)
                    merged[key] = {**base_entry, **entry}  # a user entry overrides the fields it names
                else:
                    merged[key] = entry
            out[section] = merged
    if "default_server" in user:
        out["default_server"] = user["default_server"]
    return out


def load_hardware(hardware=None) -> Hardware:
    """The shipped profiles (``data/hardware.yaml``) with the user file ``hardware`` merged over them.

    A user file has the shipped file's layout (``devices:``, ``servers:``, ``utilisation:``, ``default_server:``); an
    entry with a shipped key overrides the fields it names, a new key adds a profile. A device is given by
    ``flops_per_s`` (sustained) + ``memory_bytes``, or by datasheet numbers; a server by ``clocks_hz`` or a clock
    range, ``flops_per_cycle`` or ``cuda_cores``, ``kappa`` or ``board_power_w`` or a measured power at a clock.
    Args:
        hardware: path of a YAML file, or None for the shipped profiles only.
    Raises:
        InvalidParameterError: missing file, unknown section or field, missing or out-of-range value (named).
    """
    files = [SHIPPED_HARDWARE]
    if hardware is not None:
        path = Path(hardware)
        if not path.is_file():
            raise InvalidParameterError(f"hardware={str(hardware)!r} is invalid: must be an existing YAML file")
        files.append(path)
    return _load_hardware(*((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@lru_cache(maxsize=16)
def _load_hardware(shipped: tuple, user: tuple | None = None) -> Hardware:
    raw, source = read_yaml(shipped[0]), None
    if user is not None:
        try:
            parsed = read_yaml(user[0])
        except yaml.YAMLError as err:
            raise InvalidParameterError(f"hardware={user[0]!r} is invalid: not YAML ({err})") from None
        raw, source = _merge(raw, parsed, user[0]), user[0]
    eta = raw["utilisation"]
    eta_d, eta_s = (_number("utilisation", eta, k) for k in ("device", "server"))
    V.check_range("utilisation.device", eta_d, 1e-6, 1.0)
    V.check_range("utilisation.server", eta_s, 1e-6, 1.0)
    devices = {str(n): _device(f"devices[{n!r}]", str(n), d, eta_d) for n, d in raw["devices"].items()}
    servers = {str(n): _server(f"servers[{n!r}]", s, eta_s) for n, s in raw["servers"].items()}
    hw = Hardware(devices, servers, str(raw["default_server"]), source)
    hw.server(None, "default_server")  # the default server exists
    return hw


def load_devices(hardware=None) -> dict[str, DeviceSpec]:
    """Devices keyed by profile key, in file order (the shipped ones, with ``hardware`` merged over them)."""
    return load_hardware(hardware).devices


def load_device(name: str, hardware=None) -> DeviceSpec:
    """One device by profile key ("Device 5") or board ("Jetson Nano 4GB").

    Raises:
        InvalidParameterError: unknown name, listing the known keys and boards.
    """
    return load_hardware(hardware).device(name)


def load_server(name: str | None = None, hardware=None) -> ServerSpec:
    """A server by profile key or board (the default server, the paper's RTX 4060 Ti, for None)."""
    return load_hardware(hardware).server(name)


def load_channel(path: Path | None = None) -> ChannelSpec:
    """The channel model from ``data/channel.yaml`` (or ``path``)."""
    raw = read_yaml(path or DATA_DIR / "channel.yaml")
    return ChannelSpec(bandwidth_hz=float(_v(raw["bandwidth_hz"])),
                       snr_db={k: float(_v(v)) for k, v in raw["snr_db"].items()},
                       transition=tuple(tuple(r) for r in _v(raw["transition"])))

"""Emulated edge devices, wireless channels and a clock-controlled server (issue 4, "Device and channel emulation").

The split model really trains on this host; :class:`EmulatedDevice` (time = counted FLOPs / P_d),
:class:`EmulatedChannel` (a seeded Markov chain per device) and :class:`ServerClock` (CARD's clock through a GPU
backend of :mod:`splitlora.gpu`) turn what it did into what the paper's hardware would have taken;
:func:`kappa_calibration` fits kappa from a clock sweep. Source: docs/model.md, "Emulated hardware" (the model:
"Compute", "Channel", "Server energy").
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from splitlora import _validate as V
from splitlora.emulation.calibration import ClockSample, fit_energy_model, sweep_clocks
from splitlora.errors import InvalidParameterError
from splitlora.gpu import EmulatedBackend, GPUBackendError, get_gpu_backend
from splitlora.gpu.smoke import matmul_workload
from splitlora.model.hardware import CHANNEL_STATES, ChannelSpec, DeviceSpec, ServerSpec, load_server

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ devices
class DeviceMemoryError(InvalidParameterError):
    """A cut layer needs more device memory than the emulated board has for training."""


def measure_host_flops_per_s(size: int = 256, repeats: int = 20) -> float:
    """Sustained fp32 matmul FLOP/s of this host's CPU (torch), best of ``repeats`` (FLOP/s).

    Used only by the wall-time-scaled device time; ``size`` x ``size`` matrices, 2 size^3 FLOP each.
    """
    import torch

    V.check_int_range("size", size, 8, 1 << 14)
    V.check_int_range("repeats", repeats, 1, 10**6)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / max(best, 1e-9)


@dataclass
class EmulatedDevice:
    """An edge board emulated on the host.

    Attributes:
        spec: the board (:class:`DeviceSpec`): compute P_d (FLOP/s) and training memory M_d (byte).
        device_memory_bytes: Mem_d(c) per cut layer (byte), shape (L+1,), from the profile of the model that
            is actually trained (``ModelProfile.device_memory_bytes``).
        real_time: sleep so that the wall time of the device part equals the emulated time [False].
        host_flops_per_s: this host's FLOP/s for :meth:`wall_scaled_time_s` (None: measured on first use).
    """
    spec: DeviceSpec
    device_memory_bytes: np.ndarray
    real_time: bool = False
    host_flops_per_s: float | None = None
    slept_s: float = field(default=0.0, init=False)

    def __post_init__(self):
        self.device_memory_bytes = np.asarray(self.device_memory_bytes, dtype=float).reshape(-1)
        V.check_positive("device_memory_bytes", self.device_memory_bytes, allow_zero=True)
        if self.host_flops_per_s is not None:
            V.check_positive("host_flops_per_s", self.host_flops_per_s)

    @property
    def flops_per_s(self) -> float:
        """P_d (FLOP/s)."""
        return self.spec.flops_per_s

    @property
    def memory_bytes(self) -> float:
        """M_d, the board's training memory (byte)."""
        return self.spec.training_memory_bytes

    def check_cut(self, cut_layer: int) -> None:
        """Refuse a cut layer that does not fit.

        Raises:
            DeviceMemoryError: Mem_d(c) > M_d, naming both numbers (byte and GB).
            ValueError: cut layer outside 0..L.
        """
        L = len(self.device_memory_bytes) - 1
        V.check_int_range("cut_layer", cut_layer, 0, L)
        need = float(self.device_memory_bytes[int(cut_layer)])
        if need > self.memory_bytes:
            raise DeviceMemoryError(
                f"cut_layer={int(cut_layer)} is invalid for {self.spec.name} ({self.spec.board}): it needs "
                f"{need:.6g} byte ({need / 1e9:.3f} GB) of device memory but the board has {self.memory_bytes:.6g} "
                f"byte ({self.memory_bytes / 1e9:.3f} GB) for training; must be a cut layer whose memory fits")

    def compute_time_s(self, flops: float) -> float:
        """Emulated device time of ``flops`` FLOP: flops / P_d (s)."""
        V.check_positive("flops", flops, allow_zero=True)
        return float(flops) / self.flops_per_s

    def wall_scaled_time_s(self, host_time_s: float) -> float:
        """Host wall time rescaled to the board: host_time_s x host FLOP/s / P_d (s)."""
        V.check_positive("host_time_s", host_time_s, allow_zero=True)
        if self.host_flops_per_s is None:
            self.host_flops_per_s = measure_host_flops_per_s()
        return float(host_time_s) * self.host_flops_per_s / self.flops_per_s

    def hold(self, emulated_s: float, host_s: float) -> float:
        """In real-time mode sleep ``emulated_s - host_s`` (if positive) so the wall time matches; returns the sleep (s)."""
        if not self.real_time:
            return 0.0
        pause = max(0.0, float(emulated_s) - float(host_s))
        if pause > 0:
            time.sleep(pause)
        self.slept_s += pause
        return pause


@dataclass
class FlopCount:
    """FLOPs of one split step, filled in when :func:`flop_counter` exits: ``device`` and ``server`` (FLOP)."""
    device: float = 0.0
    server: float = 0.0


@contextmanager
def flop_counter():
    """Count the FLOPs of the split step run in the block; yields a :class:`FlopCount` filled in on exit.

    The block runs under ``FlopCounterMode`` with sdpa forced to its math backend (the fused CPU kernel has no
    FLOP formula). Server FLOPs are those attributed to the ``ServerPart`` module (its forward and backward);
    device FLOPs are the rest of the step (``DevicePart`` forward and its backward, which FlopCounterMode
    attributes to no module because it is started from the received gradient).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    out = FlopCount()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield out
    counts = counter.get_flop_counts()
    total = float(sum(counts.get("Global", {}).values()))
    out.server = float(sum(counts.get("ServerPart", {}).values()))
    out.device = total - out.server


def count_step_flops(trainer, batch, device_id: int, cut_layer: int, round_index: int = 0):
    """One :meth:`SplitTrainer.step`, counted by :func:`flop_counter`: returns ``(StepLog, device FLOP, server
    FLOP)``."""
    with flop_counter() as counted:
        log = trainer.step(batch, device_id, int(cut_layer), round_index)
    return log, counted.device, counted.server


# ------------------------------------------------------------------------------------------ channel
class EmulatedChannel:
    """Per-device Markov channel states (Good/Normal/Poor), one step per round, and transfer times.

    Args:
        spec: :class:`ChannelSpec` (rates per state, transition matrix).
        num_devices: M >= 1 independent chains.
        seed: numpy seed; the state sequence equals ``spec.simulate(rounds, num_devices, seed=seed,
            initial=initial)`` row by row.
        initial: start state of every device, or None for a draw from the stationary distribution.
        real_time: :meth:`transfer` sleeps for the transfer time [False].
    """
    def __init__(self, spec: ChannelSpec, num_devices: int, *, seed: int = 0, initial: str | None = None,
                 real_time: bool = False):
        V.check_int_range("num_devices", num_devices, 1, 10**9)
        self.spec, self.num_devices, self.real_time = spec, int(num_devices), bool(real_time)
        self._rng = np.random.default_rng(seed)
        self._cum = np.cumsum(np.asarray(spec.transition, dtype=float), axis=1)
        if initial is None:
            self._state = self._rng.choice(3, size=self.num_devices, p=spec.stationary())
        else:
            V.check_choice("initial", initial, CHANNEL_STATES)
            self._state = np.full(self.num_devices, CHANNEL_STATES.index(initial), dtype=np.int64)
        self._rates = spec.rates_bps()
        self.round = 0
        self.slept_s = 0.0

    @property
    def states(self) -> np.ndarray:
        """Current state index of every device (0 = Good, 1 = Normal, 2 = Poor), shape (M,) (copy)."""
        return self._state.copy()

    def advance(self) -> np.ndarray:
        """Step every device's chain once (the next round); returns the new states (M,)."""
        u = self._rng.random(self.num_devices)
        self._state = np.minimum((u[:, None] > self._cum[self._state]).sum(1), 2)
        self.round += 1
        return self.states

    def run(self, rounds: int) -> np.ndarray:
        """States of the next ``rounds`` rounds, shape (N, M): the current states, then N - 1 advances."""
        V.check_int_range("rounds", rounds, 1, 10**9)
        out = [self.states]
        for _ in range(rounds - 1):
            out.append(self.advance())
        return np.stack(out)

    def state_name(self, device: int) -> str:
        """"Good", "Normal" or "Poor" of device ``device`` now."""
        return CHANNEL_STATES[int(self._state[self._device(device)])]

    def rate_bps(self, device: int) -> float:
        """Rate of device ``device``'s link now (bit/s), the same up and down."""
        return float(self._rates[self._state[self._device(device)]])

    def transfer_time_s(self, n_bits: float, device: int) -> float:
        """Seconds to send ``n_bits`` bits over device ``device``'s link now: n_bits / rate."""
        V.check_positive("n_bits", n_bits, allow_zero=True)
        return float(n_bits) / self.rate_bps(device)

    def transfer(self, n_bytes: float, device: int) -> float:
        """Send ``n_bytes`` bytes over device ``device``'s link: returns the transfer time (s); sleeps for it
        in real-time mode (the data itself is already at the receiver: both ends live in this process)."""
        t = self.transfer_time_s(8.0 * float(n_bytes), device)
        if self.real_time and t > 0:
            time.sleep(t)
            self.slept_s += t
        return t

    def _device(self, device: int) -> int:
        V.check_int_range("device", device, 0, self.num_devices - 1)
        return int(device)


# ------------------------------------------------------------------------------------------- server
@dataclass
class ServerTurn:
    """What the server did in one device's turn; filled in when :meth:`ServerClock.turn` exits.

    Attributes:
        requested_hz: CARD's clock (Hz; 0 = idle). applied_hz: clock read back from the backend (Hz; 0 idle).
        flops: server FLOPs reported with :meth:`run_flops`. cycles: flops / (eta_s g_s).
        time_s, energy_j: the backend's energy window (virtual time and energy when emulated).
    """
    requested_hz: float
    applied_hz: float = 0.0
    flops: float = 0.0
    cycles: float = 0.0
    time_s: float = 0.0
    energy_j: float = 0.0
    _server: "ServerClock | None" = field(default=None, repr=False)

    def run_flops(self, flops: float) -> None:
        """Report server work of ``flops`` FLOP done in this turn; the emulated backend runs its cycles."""
        V.check_positive("flops", flops, allow_zero=True)
        if flops > 0 and self.requested_hz <= 0:
            raise InvalidParameterError(f"flops={flops!r} is invalid in an idle turn (requested_hz=0): must be 0")
        cyc = float(flops) / self._server.flops_per_cycle
        self.flops += float(flops)
        self.cycles += cyc
        if self._server.emulated and cyc > 0:
            self._server.backend.run_cycles(cyc)


class ServerClock:
    """The server GPU obeying CARD: each turn locks the clock to the decided frequency and measures energy.

    Args:
        backend: a :class:`splitlora.gpu.GPUClockBackend` (default: an emulated one from ``server``).
        server: the :class:`ServerSpec` (utilisation eta_s and FLOP/cycle g_s turn FLOPs into cycles).
        real_time: with the emulated backend, sleep the server's virtual time [False].
    """
    def __init__(self, server: ServerSpec, backend=None, *, real_time: bool = False):
        self.server = server
        self.backend = backend if backend is not None else emulated_server_backend(server)
        self.emulated = isinstance(self.backend, EmulatedBackend)
        self.real_time = bool(real_time)
        self.flops_per_cycle = server.utilisation * server.flops_per_cycle   # eta_s g_s (FLOP/cycle)

    @contextmanager
    def turn(self, freq_hz: float):
        """Context manager for one device's turn at clock ``freq_hz`` (Hz); yields a :class:`ServerTurn`.

        ``freq_hz`` of 0 or NaN means the server is idle (device-only cut): nothing is locked and the turn
        costs 0 s and 0 J. Otherwise the block runs inside ``backend.locked_clock(freq_hz)`` and an energy
        window; the clock is restored whatever happens (see :meth:`GPUClockBackend.locked_clock`).
        """
        f = float(freq_hz) if freq_hz is not None else 0.0
        turn = ServerTurn(requested_hz=0.0 if not np.isfinite(f) else max(f, 0.0), _server=self)
        if turn.requested_hz <= 0:
            yield turn
            return
        with self.backend.locked_clock(turn.requested_hz) as lock, \
                self.backend.energy_window("splitlora-server-turn") as window:
            yield turn
        turn.applied_hz = lock.applied_hz
        turn.time_s, turn.energy_j = window.measurement.time_s, window.measurement.energy_j
        if self.real_time and self.emulated and turn.time_s > 0:
            time.sleep(turn.time_s)


def emulated_server_backend(server: ServerSpec):
    """An :class:`EmulatedBackend` with the server's kappa, static power and clock table."""
    return EmulatedBackend(kappa=server.kappa, f_min_hz=server.f_min_hz, f_max_hz=server.f_max_hz,
                           step_hz=server.clock_step_hz, static_power_w=server.static_power_w)


# --------------------------------------------------------------------------------------- calibration
def kappa_calibration(server: ServerSpec | None = None, *, n_clocks: int = 8, repeats: int = 2,
                      allow_clock_control: bool = False, emulated_cycles: float = 2.0e10,
                      emulated_noise: float = 0.02, seed: int = 0, matmul_size: int = 4096,
                      matmul_iters: int = 50) -> pd.DataFrame:
    """Sweep the server GPU clock and fit E = kappa f^3 t + P0 t (:func:`splitlora.emulation.calibration.fit_energy_model`).

    Real hardware is used when a GPU backend is found (``get_gpu_backend("auto")``) and clock control is
    allowed (``allow_clock_control=True`` or ``SPLITLORA_ALLOW_CLOCK_CONTROL=1``) and the driver accepts it;
    the workload is ``matmul_iters`` fp16 ``matmul_size``^2 matmuls. Otherwise the sweep runs on the emulated
    backend of ``server`` (its kappa and P0) with ``emulated_cycles`` cycles per sample, and relative Gaussian
    noise ``emulated_noise`` (seeded) is added to the emulated energies so that the fit has residuals; the
    ``source`` column says which, and why.

    Returns:
        One row per sample: source, clock_mhz, requested_mhz, time_s, energy_j, power_w, fitted_power_w,
        kappa_fit (W/Hz^3), static_power_fit_w, kappa_model (the server spec's kappa), r_squared.
    """
    server = server or load_server()
    V.check_int_range("n_clocks", n_clocks, 2, 10**4)
    V.check_int_range("repeats", repeats, 1, 10**4)
    V.check_positive("emulated_cycles", emulated_cycles)
    V.check_positive("emulated_noise", emulated_noise, allow_zero=True)
    samples, source = None, None
    try:
        gpu = get_gpu_backend("auto", allow_clock_control=allow_clock_control)
        if not gpu.clock_control_allowed:
            reason = f"{gpu.name} GPU found but clock control not allowed (read-only)"
            gpu.close()
        else:
            clocks = np.asarray(gpu.supported_clocks_mhz()) * 1e6
            work = matmul_workload(getattr(gpu, "gpu_index", 0), matmul_size, matmul_iters)
            targets = np.quantile(clocks, np.linspace(0.2, 1.0, n_clocks))
            try:
                samples = sweep_clocks(gpu, work, targets, repeats=repeats)
            finally:
                gpu.close()
            source = f"real hardware ({gpu.name} backend)"
    except GPUBackendError as err:
        reason = f"no usable real GPU backend ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
    if samples is None:
        gpu = emulated_server_backend(server)
        targets = np.linspace(server.f_min_hz + 0.2 * (server.f_max_hz - server.f_min_hz), server.f_max_hz, n_clocks)
        samples = sweep_clocks(gpu, lambda: gpu.run_cycles(emulated_cycles), targets, repeats=repeats)
        rng = np.random.default_rng(seed)

        samples = [ClockSample(s.clock_hz, s.time_s, s.energy_j * (1.0 + emulated_noise * rng.standard_normal()),
                               s.requested_hz) for s in samples]
        source = f"emulated backend (kappa of {server.board}); {reason}"
        logger.warning("kappa calibration on the EMULATED backend: %s", reason)
    fit = fit_energy_model(samples)
    rows = []
    for s in samples:
        rows.append({"source": source, "clock_mhz": s.clock_hz / 1e6, "requested_mhz": s.requested_hz / 1e6,
                     "time_s": s.time_s, "energy_j": s.energy_j, "power_w": s.energy_j / s.time_s,
                     "fitted_power_w": float(fit.power_w(s.clock_hz)), "kappa_fit": fit.kappa,
                     "static_power_fit_w": fit.static_power_w, "kappa_model": server.kappa,
                     "r_squared": fit.r_squared})
    return pd.DataFrame(rows)

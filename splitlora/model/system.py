"""The delay and server-energy model of split LoRA fine-tuning: :class:`Workload` and :class:`CostModel`.

Per mini-batch T_d = F_d / P_d, T_l = 8 (S + B s b_y) / R_up + 8 G / R_down, T_s = C_s / f and
E_s = kappa C_s f^2 + P0 C_s / f; a round of I mini-batches adds the hand-over of the device-side adapter.
Everything is vectorised over cut layers and device-rounds. Source: docs/model.md, "Delay and energy".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitlora import _validate as V
from splitlora.errors import InvalidParameterError
from splitlora.model.hardware import ServerSpec

SCHEDULES = ("sequential", "pipelined", "parallel", "parallel-pipelined")
#: Schedules where the devices of a round train at the same time and share the server (docs/model.md "Schedules").
PARALLEL_SCHEDULES = ("parallel", "parallel-pipelined")


def compute_time_s(cycles, f_hz):
    """T = C / f: seconds to run C GPU cycles at clock f (Hz), broadcasting; 0 where C = 0 (docs/model.md
    "Delay and energy")."""
    C = np.asarray(cycles, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(C > 0, C / np.asarray(f_hz, dtype=float), 0.0)


def compute_energy_j(cycles, f_hz, kappa: float, static_power_w: float = 0.0):
    """E = kappa C f^2 + P0 C / f: energy (J) of C GPU cycles at clock f (Hz) with effective switched capacitance
    kappa (W/Hz^3; dynamic power kappa f^3) and static power P0 (W) over the busy time C / f, broadcasting; 0 where
    C = 0 (docs/model.md "Delay and energy"). The one place this formula is written."""
    C = np.asarray(cycles, dtype=float)
    f = np.asarray(f_hz, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(C > 0, kappa * C * f ** 2 + static_power_w * C / f, 0.0)


@dataclass(frozen=True)
class Workload:
    """What one device does in one round (docs/model.md "Workload and defaults").

    Attributes:
        steps_per_round: I, mini-batches each device trains per round (-).
        adapter_bytes_per_param: b_A, bytes per LoRA parameter handed over: its fp32 weight and the two fp32
            AdamW moments (12), since exact sequential training moves the optimiser state with the adapter (byte).
        label_bytes_per_token: b_y, bytes per label token sent up with the smashed data when c < L (the loss is
            on the server; int64 token ids: 8) (byte).
        schedule: one of :data:`SCHEDULES` (docs/model.md "Schedules"): "sequential" (the paper's setting as
            reconstructed: devices one after another, and per mini-batch device, link and server one after the
            other), "pipelined" (the device starts the next mini-batch while the link and the server handle the
            current one), "parallel" (all devices of a round at once, the server's clock divided among them) or
            "parallel-pipelined" (both).
    """

    steps_per_round: int = 10
    adapter_bytes_per_param: float = 12.0
    label_bytes_per_token: float = 8.0
    schedule: str = "sequential"

    def __post_init__(self):
        V.check_int_range("steps_per_round", self.steps_per_round, 1, 10**9)
        V.check_positive("adapter_bytes_per_param", self.adapter_bytes_per_param)
        V.check_positive("label_bytes_per_token", self.label_bytes_per_token, allow_zero=True)
        V.check_choice("schedule", self.schedule, SCHEDULES)


@dataclass(frozen=True)
class CostModel:
    """Per-cut-layer costs of one model on one server, ready for vectorised evaluation.

    Attributes (arrays of shape (L+1,), index = cut layer c):
        device_flops: F_d(c), device forward + backward FLOPs per mini-batch (FLOP).
        server_cycles: C_s(c), server GPU cycles per mini-batch (cycle); 0 at c = L.
        smashed_bits: 8 (S(c) + B s b_y), bits of smashed data and labels sent up per mini-batch (bit); 0 at c = L.
        grad_bits: 8 G(c), bits of its gradient sent down per mini-batch (bit); G = S except 0 at c = 0
            (no device-side LoRA, nothing to send back) and c = L.
        handover_bits: 8 A(c) b_A, bits of the device-side LoRA adapter (bit).
        device_memory_bytes: Mem_d(c), device memory needed for training (byte), without the runtime reserve.
        kappa: server effective switched capacitance (W/Hz^3); static_power_w: P0 (W).
        f_min_hz, f_max_hz: server clock range (Hz); clocks_hz: supported-clock table (Hz), shape (K_f,).
        iterations: I (-); schedule: one of :data:`SCHEDULES` (see :class:`Workload`).
    Everything is vectorised: per device-round inputs have shape (K,), results (K, L+1) or (K,).
    Build it with :meth:`from_profile`.
    """

    device_flops: np.ndarray
    server_cycles: np.ndarray
    smashed_bits: np.ndarray
    grad_bits: np.ndarray
    handover_bits: np.ndarray
    device_memory_bytes: np.ndarray
    kappa: float
    static_power_w: float
    f_min_hz: float
    f_max_hz: float
    clocks_hz: np.ndarray
    iterations: int
    schedule: str = "sequential"

    @property
    def pipelined(self) -> bool:
        """Whether each device's mini-batches overlap device, link and server work ("pipelined" schedules)."""
        return self.schedule in ("pipelined", "parallel-pipelined")

    @property
    def parallel(self) -> bool:
        """Whether the devices of a round train at the same time, sharing the server's clock."""
        return self.schedule in PARALLEL_SCHEDULES

    @property
    def n_cuts(self) -> int:
        """L, the largest cut layer (device-only)."""
        return len(self.device_flops) - 1

    @classmethod
    def from_profile(cls, profile, server: ServerSpec, workload: Workload = Workload()) -> "CostModel":
        """Build from a :class:`splitlora.model.profile.ModelProfile` (or any object with its per-cut arrays).

        Raises:
            ValueError: a per-cut array with NaN, negative values, or the wrong length.
        """
        L = int(profile.n_cuts)
        arrays = {}
        for name in ("device_fwd_flops", "device_bwd_flops", "server_fwd_flops", "server_bwd_flops",
                     "smashed_bytes", "device_memory_bytes", "device_lora_params"):
            a = np.asarray(getattr(profile, name), dtype=float)
            if a.shape != (L + 1,):
                raise InvalidParameterError(f"profile.{name} has shape {a.shape}: must be ({L + 1},) = (n_cuts + 1,)")
            V.check_positive(f"profile.{name}", a, allow_zero=True)
            arrays[name] = a
        grad = np.asarray(getattr(profile, "grad_bytes", arrays["smashed_bytes"]), dtype=float)
        V.check_positive("profile.grad_bytes", grad, allow_zero=True)
        server_flops = arrays["server_fwd_flops"] + arrays["server_bwd_flops"]
        return cls(
            device_flops=arrays["device_fwd_flops"] + arrays["device_bwd_flops"],
            server_cycles=server_flops / (server.utilisation * server.flops_per_cycle),
            smashed_bits=8.0 * (arrays["smashed_bytes"] + np.where(
                np.arange(L + 1) < L, profile.batch_size * profile.seq_len * workload.label_bytes_per_token, 0.0)),
            grad_bits=8.0 * grad,
            handover_bits=8.0 * arrays["device_lora_params"] * workload.adapter_bytes_per_param,
            device_memory_bytes=arrays["device_memory_bytes"],
            kappa=server.kappa, static_power_w=server.static_power_w,
            f_min_hz=server.f_min_hz, f_max_hz=server.f_max_hz,
            clocks_hz=server.supported_clocks_hz(), iterations=workload.steps_per_round,
            schedule=workload.schedule,
        )

    # --- the model's terms ---------------------------------------------------------------------
    def stage_times_s(self, device_flops_per_s, rate_up_bps, rate_down_bps):
        """Per mini-batch device time T_d and link time T_l, and the round's hand-over time (s).

        Args: device_flops_per_s P_d, rate_up_bps, rate_down_bps: arrays of shape (K,) (FLOP/s, bit/s).
        Returns: (T_d, T_l, T_handover), each of shape (K, L+1).
        Raises: ValueError for non-positive or NaN inputs.
        """
        P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
        t_d = self.device_flops[None, :] / P[:, None]
        t_l = self.smashed_bits[None, :] / Ru[:, None] + self.grad_bits[None, :] / Rd[:, None]
        t_h = self.handover_bits[None, :] * (1.0 / Ru + 1.0 / Rd)[:, None]
        return t_d, t_l, t_h

    def round_delay_s(self, t_d, t_l, t_h, t_s):
        """One device's round delay from its per-mini-batch stage times (s), broadcasting all four arguments.

        sequential, parallel: I (T_d + T_l + T_s) + T_handover;
        pipelined, parallel-pipelined: (I - 1) max(T_d, T_l, T_s) + (T_d + T_l + T_s) + T_handover (fill and drain
        once, then the slowest stage sets the pace; docs/model.md "Pipelined schedule"). Under the parallel
        schedules this is the time at which the device finishes; the round ends with the last (:meth:`parallel_round`).
        """
        if self.pipelined:
            return (self.iterations - 1) * np.maximum(np.maximum(t_d, t_l), t_s) + t_d + t_l + t_s + t_h
        return self.iterations * (t_d + t_l + t_s) + t_h

    def server_time_s(self, cut_layer, f_hz) -> np.ndarray:
        """T_s = C_s(c) / f per mini-batch (s); 0 where C_s = 0 (device-only). Broadcasts cut_layer with f_hz."""
        return compute_time_s(self.server_cycles[np.asarray(cut_layer)], f_hz)

    def fixed_delay_s(self, device_flops_per_s, rate_up_bps, rate_down_bps) -> np.ndarray:
        """Sequential schedule only: the part of the round delay that does not depend on f, I (T_d + T_l) +
        hand-over (s).

        Args: device_flops_per_s P_d, rate_up_bps, rate_down_bps: arrays of shape (K,) (FLOP/s, bit/s).
        Returns: shape (K, L+1).
        Raises: ValueError for non-positive or NaN inputs.
        """
        if self.schedule != "sequential":
            raise InvalidParameterError(f"schedule={self.schedule!r} is invalid here: fixed_delay_s needs 'sequential' "
                             "(use stage_times_s and round_delay_s)")
        P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
        inv_r = (1.0 / Ru + 1.0 / Rd)[:, None]
        link = self.smashed_bits[None, :] / Ru[:, None] + self.grad_bits[None, :] / Rd[:, None]
        return self.iterations * (self.device_flops[None, :] / P[:, None] + link) + self.handover_bits[None, :] * inv_r

    def server_delay_s(self, cut_layer, f_hz) -> np.ndarray:
        """I C_s(c) / f (s); 0 where C_s = 0 (device-only), whatever f. Broadcasts cut_layer with f_hz."""
        return compute_time_s(self.iterations * self.server_cycles[np.asarray(cut_layer)], f_hz)

    def server_energy_j(self, cut_layer, f_hz) -> np.ndarray:
        """I (kappa C_s(c) f^2 + P0 C_s(c) / f) (J); 0 at device-only. Broadcasts cut_layer with f_hz."""
        return self.energy_j(self.iterations * self.server_cycles[np.asarray(cut_layer)], f_hz)

    def energy_j(self, cycles, f_hz) -> np.ndarray:
        """Energy (J) of ``cycles`` GPU cycles at ``f_hz`` on this server (:func:`compute_energy_j`)."""
        return compute_energy_j(cycles, f_hz, self.kappa, self.static_power_w)

    def feasible(self, memory_bytes) -> np.ndarray:
        """Mem_d(c) <= M_d, shape (K, L+1) for device training memory M_d of shape (K,) (byte)."""
        M = np.asarray(memory_bytes, dtype=float).reshape(-1)
        V.check_positive("memory_bytes", M)
        return self.device_memory_bytes[None, :] <= M[:, None]

    def evaluate(self, cut_layer, f_hz, device_flops_per_s, rate_up_bps, rate_down_bps):
        """Round delay (s) and server energy (J) of given decisions, each of shape (K,).

        Args:
            cut_layer: int array (K,) in 0..L; f_hz: server clock (K,) in [f_min, f_max] (ignored where c = L).
            device_flops_per_s, rate_up_bps, rate_down_bps: (K,) (FLOP/s, bit/s).
        Returns:
            (delay_s, energy_j), each (K,).
        Raises:
            ValueError: cut layer out of 0..L, clock outside [f_min, f_max], bad rates/compute.
        """
        c = np.asarray(cut_layer).reshape(-1)
        V.check_int_range("cut_layer", c, 0, self.n_cuts)
        c = c.astype(np.int64)
        f = np.broadcast_to(np.asarray(f_hz, dtype=float).reshape(-1), c.shape)
        active = c < self.n_cuts
        if np.any(active):
            V.check_range("f_hz", f[active], self.f_min_hz * (1 - 1e-12), self.f_max_hz * (1 + 1e-12))
        t_d, t_l, t_h = self.stage_times_s(device_flops_per_s, rate_up_bps, rate_down_bps)
        rows = np.arange(c.shape[0])
        pick = lambda a: np.broadcast_to(a, (c.shape[0], a.shape[1]))[rows, c]  # noqa: E731
        T = self.round_delay_s(pick(t_d), pick(t_l), pick(t_h), self.server_time_s(c, f))
        return T, self.server_energy_j(c, f)

    def references(self, device_flops_per_s, rate_up_bps, rate_down_bps):
        """Normalisers (T_ref, E_ref), each (K,): the server-only benchmark (c = 0) at f_max (docs/model.md "Objective")."""
        P, Ru, Rd = device_round_inputs(device_flops_per_s, rate_up_bps, rate_down_bps)
        zeros = np.zeros(P.shape, dtype=np.int64)
        return self.evaluate(zeros, np.full(P.shape, self.f_max_hz), P, Ru, Rd)


    # --- parallel schedules ---------------------------------------------------------------------
    def parallel_round(self, cut_layer, f_hz, device_flops_per_s, rate_up_bps, rate_down_bps):
        """Cost of parallel rounds: every device of a round trains at once with its share of the server clock.

        Device m of round n finishes at T_nm (:meth:`round_delay_s` with T_s = C_s(c) / f_nm); the round ends
        when the last one does, T_n = max_m T_nm; the server energy is E_n = sum_m I E_s(c_nm, f_nm) (docs/model.md
        "Parallel schedule"). The shares are coupled: sum_m f_nm <= f_max over the devices with c < L.

        Args:
            cut_layer: int array (N, M) in 0..L; f_hz: clock shares (N, M) in (0, f_max] where c < L (ignored,
                reported 0, where c = L) (Hz).
            device_flops_per_s, rate_up_bps, rate_down_bps: (N, M) (FLOP/s, bit/s).
        Returns:
            (round_delay_s (N,), round_energy_j (N,), device_delay_s (N, M), device_energy_j (N, M)).
        Raises:
            InvalidParameterError: a cut outside 0..L, a share outside (0, f_max], shares of a round summing above
            f_max, shapes that differ, bad compute or rates.
        """
        c = np.asarray(cut_layer)
        if c.ndim != 2:
            raise InvalidParameterError(f"cut_layer has shape {c.shape}: must be (rounds, devices)")
        V.check_int_range("cut_layer", c, 0, self.n_cuts)
        c = c.astype(np.int64)
        f = np.broadcast_to(np.asarray(f_hz, dtype=float), c.shape)
        active = c < self.n_cuts
        f = np.where(active, f, 0.0)
        if np.any(active):
            V.check_range("f_hz", f[active], np.finfo(float).tiny, self.f_max_hz * (1 + 1e-12))
        V.check_range("sum of the clock shares of a round", f.sum(1), 0.0, self.f_max_hz * (1 + 1e-9))
        P, Ru, Rd = (np.broadcast_to(np.asarray(a, dtype=float), c.shape)
                     for a in (device_flops_per_s, rate_up_bps, rate_down_bps))
        t_d, t_l, t_h = self.stage_times_s(P.reshape(-1), Ru.reshape(-1), Rd.reshape(-1))
        rows, flat = np.arange(c.size), c.reshape(-1)
        T = self.round_delay_s(t_d[rows, flat], t_l[rows, flat], t_h[rows, flat],
                               self.server_time_s(flat, f.reshape(-1))).reshape(c.shape)
        E = self.server_energy_j(flat, f.reshape(-1)).reshape(c.shape)
        return T.max(1), E.sum(1), T, E

    def parallel_references(self, device_flops_per_s, rate_up_bps, rate_down_bps):
        """Normalisers (T_ref, E_ref) of parallel rounds, each (N,): every device server-only (c = 0) with an equal
        share f_max / M of the clock (docs/model.md "Parallel schedule"). Inputs (N, M) as :meth:`parallel_round`."""
        P = np.asarray(device_flops_per_s, dtype=float)
        if P.ndim != 2:
            raise InvalidParameterError(f"device_flops_per_s has shape {P.shape}: must be (rounds, devices)")
        T, E, _, _ = self.parallel_round(np.zeros(P.shape, dtype=np.int64), self.f_max_hz / P.shape[1], P,
                                         rate_up_bps, rate_down_bps)
        return T, E


def objective(delay_s, energy_j, t_ref_s, e_ref_j, w: float):
    """U = w T / T_ref + (1 - w) E / E_ref (dimensionless), docs/model.md "Objective".

    Raises: ValueError if w is not in [0, 1].
    """
    check_weight(w)
    return w * np.asarray(delay_s) / t_ref_s + (1.0 - w) * np.asarray(energy_j) / e_ref_j


def check_weight(w) -> None:
    """Raise ValueError unless the delay weight w is a finite number in [0, 1]."""
    V.check_range("w", w, 0.0, 1.0)


def device_round_inputs(P, Ru, Rd):
    """(P_d, R_up, R_down) as float arrays of shape (K,), each checked finite and > 0 (FLOP/s, bit/s, bit/s)."""
    P = np.asarray(P, dtype=float).reshape(-1)
    Ru = np.asarray(Ru, dtype=float).reshape(-1)
    Rd = np.asarray(Rd, dtype=float).reshape(-1)
    V.check_positive("device_flops_per_s", P)
    V.check_positive("rate_up_bps", Ru)
    V.check_positive("rate_down_bps", Rd)
    return np.broadcast_arrays(P, Ru, Rd)

"""Channels that change within a round: per-mini-batch link rates of shape (N rounds, M devices, I mini-batches).

Two processes, both with a coherence time given in mini-batches: the finite-state Markov channel of data/channel.yaml
taking one step per coherence time (block fading), and a Rayleigh-fading SNR whose complex gain is a first-order
Gauss-Markov process with the Clarke/Jakes correlation J0(2 pi f_D T). Source: docs/model.md, "Channel dynamics".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import integrate, special

from splitlora import _validate as V
from splitlora.model.hardware import ChannelSpec, _v, load_channel, read_yaml, shannon_rate_bps
from splitlora.paths import DATA_DIR

PROCESSES = ("Markov", "Rayleigh")
SPEED_OF_LIGHT_M_PER_S = 299_792_458.0
_MAX = 10**8


@dataclass(frozen=True)
class FadingSpec:
    """Rayleigh fading of the device-server link (data/channel.yaml, ``fading``).

    Attributes:
        mean_snr_db: average SNR (dB); carrier_hz: carrier frequency (Hz); speed_m_per_s: device speed (m/s);
        coherence_constant: k in T_c = k / f_D (-); min_spectral_efficiency: rate floor in a deep fade (bit/s/Hz).
    Raises: InvalidParameterError for a non-finite SNR or a non-positive other field.
    """

    mean_snr_db: float
    carrier_hz: float
    speed_m_per_s: float
    coherence_constant: float
    min_spectral_efficiency: float

    def __post_init__(self):
        V.check_finite("mean_snr_db", self.mean_snr_db)
        for name in ("carrier_hz", "speed_m_per_s", "coherence_constant", "min_spectral_efficiency"):
            V.check_positive(name, getattr(self, name))

    @property
    def doppler_hz(self) -> float:
        """Maximum Doppler shift f_D = v f_c / c (Hz)."""
        return self.speed_m_per_s * self.carrier_hz / SPEED_OF_LIGHT_M_PER_S

    @property
    def coherence_time_s(self) -> float:
        """Coherence time T_c = k / f_D (s) (Rappaport, Wireless Communications, 2nd ed., Eq. 5.40.c)."""
        return self.coherence_constant / self.doppler_hz

    def rates_bps(self, bandwidth_hz: float, snr_linear) -> np.ndarray:
        """W max(log2(1 + SNR), min_spectral_efficiency) (bit/s) for linear SNR values, any shape."""
        snr_db = 10.0 * np.log10(np.maximum(np.asarray(snr_linear, dtype=float), 1e-300))
        return np.maximum(shannon_rate_bps(bandwidth_hz, snr_db), bandwidth_hz * self.min_spectral_efficiency)

    def expected_rate_bps(self, bandwidth_hz: float) -> float:
        """E[R] over Rayleigh fading, |h|^2 ~ Exp(1) (bit/s), by numerical integration (scipy.integrate.quad)."""
        g = 10.0 ** (self.mean_snr_db / 10.0)
        value, _ = integrate.quad(lambda x: float(self.rates_bps(bandwidth_hz, g * x)) * np.exp(-x), 0.0, np.inf,
                                  limit=200)
        return float(value)


def load_fading(path: Path | None = None) -> FadingSpec:
    """The ``fading`` block of ``data/channel.yaml`` (or ``path``)."""
    raw = read_yaml(path or DATA_DIR / "channel.yaml")["fading"]
    return FadingSpec(**{k: float(_v(raw[k])) for k in ("mean_snr_db", "carrier_hz", "speed_m_per_s",
                                                        "coherence_constant", "min_spectral_efficiency")})


def gauss_markov_correlation(coherence_steps: float, coherence_constant: float = 0.423) -> float:
    """Correlation rho of the complex gain between consecutive mini-batches, J0(2 pi f_D T) with f_D T = k / tau.

    coherence_steps: tau = T_c / T, the coherence time in mini-batches (> 0). Past J0's first zero (tau < ~1.1) the
    samples are taken as uncorrelated (rho = 0). Raises InvalidParameterError for tau <= 0.
    """
    V.check_positive("coherence_steps", coherence_steps)
    x = 2.0 * np.pi * coherence_constant / float(coherence_steps)
    return float(special.j0(x)) if x < special.jn_zeros(0, 1)[0] else 0.0


def _check(rounds, steps_per_round, num_devices, coherence_steps):
    V.check_int_range("rounds", rounds, 1, _MAX)
    V.check_int_range("steps_per_round", steps_per_round, 1, _MAX)
    V.check_int_range("num_devices", num_devices, 1, _MAX)
    V.check_int_range("coherence_steps", coherence_steps, 1, _MAX)


def markov_rates_bps(rounds: int, steps_per_round: int, num_devices: int, coherence_steps: int, *, seed: int = 0,
                     channel: ChannelSpec | None = None) -> np.ndarray:
    """Per-mini-batch rates (bit/s), shape (N, M, I): the Markov chain of ``channel`` (default data/channel.yaml)
    takes one step every ``coherence_steps`` mini-batches (blocks start at the first mini-batch), stationary start.
    ``coherence_steps = steps_per_round`` is the paper's one step per round. Raises InvalidParameterError."""
    _check(rounds, steps_per_round, num_devices, coherence_steps)
    channel = channel or load_channel()
    n_mb = rounds * steps_per_round
    blocks = channel.simulate(-(-n_mb // coherence_steps), num_devices, seed=seed)        # (blocks, M)
    states = np.repeat(blocks, coherence_steps, axis=0)[:n_mb]                          # (N I, M)
    return channel.rates_bps()[states].reshape(rounds, steps_per_round, num_devices).transpose(0, 2, 1)


def rayleigh_rates_bps(rounds: int, steps_per_round: int, num_devices: int, coherence_steps: int, *, seed: int = 0,
                       fading: FadingSpec | None = None, bandwidth_hz: float | None = None) -> np.ndarray:
    """Per-mini-batch rates (bit/s), shape (N, M, I), of Rayleigh fading: h_t = rho h_(t-1) + sqrt(1 - rho^2) n_t,
    n_t ~ CN(0, 1), h_0 ~ CN(0, 1) (stationary), rho = :func:`gauss_markov_correlation`; SNR = mean_snr |h|^2;
    rate :meth:`FadingSpec.rates_bps`. Defaults: data/channel.yaml. Raises InvalidParameterError."""
    _check(rounds, steps_per_round, num_devices, coherence_steps)
    fading = fading or load_fading()
    W = load_channel().bandwidth_hz if bandwidth_hz is None else bandwidth_hz
    rho = gauss_markov_correlation(coherence_steps, fading.coherence_constant)
    rng = np.random.default_rng(seed)
    n_mb = rounds * steps_per_round
    noise = (rng.standard_normal((n_mb, num_devices)) + 1j * rng.standard_normal((n_mb, num_devices))) / np.sqrt(2)
    h = np.empty_like(noise)
    h[0] = noise[0]
    s = np.sqrt(1.0 - rho ** 2)
    for t in range(1, n_mb):
        h[t] = rho * h[t - 1] + s * noise[t]
    snr = 10.0 ** (fading.mean_snr_db / 10.0) * np.abs(h) ** 2
    return fading.rates_bps(W, snr).reshape(rounds, steps_per_round, num_devices).transpose(0, 2, 1)


def minibatch_rates_bps(process: str, rounds: int, steps_per_round: int, num_devices: int, coherence_steps: int, *,
                        seed: int = 0):
    """(rates (N, M, I) bit/s, expected rate E[R] bit/s) of ``process`` ("Markov" or "Rayleigh"; data/channel.yaml).

    Raises InvalidParameterError for an unknown process or bad sizes."""
    V.check_choice("process", process, PROCESSES)
    if process == "Markov":
        ch = load_channel()
        return (markov_rates_bps(rounds, steps_per_round, num_devices, coherence_steps, seed=seed, channel=ch),
                float(ch.stationary() @ ch.rates_bps()))
    fading = load_fading()
    return (rayleigh_rates_bps(rounds, steps_per_round, num_devices, coherence_steps, seed=seed, fading=fading),
            fading.expected_rate_bps(load_channel().bandwidth_hz))

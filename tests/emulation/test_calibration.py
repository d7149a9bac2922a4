"""Calibration: least-squares kappa/P0 from (clock, time, energy) samples; sweep through the emulated GPU."""
import numpy as np
import pytest

from splitlora.emulation.calibration import ClockSample, EnergyFit, fit_energy_model, sweep_clocks
from splitlora.gpu import ClockControlNotAllowedError, EmulatedBackend
from splitlora.gpu.nvml import NVMLBackend

KAPPA, P0 = 3.2e-27, 35.0  # W/Hz^3, W (synthetic truth)


def synthetic(n=40, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.uniform(300e6, 2.5e9, n)
    cycles = rng.uniform(1e9, 5e10, n)
    t = cycles / f
    e = KAPPA * cycles * f ** 2 + P0 * t
    return f, t, e * (1 + noise * rng.standard_normal(n))


def test_recovers_kappa_and_static_power_with_noise():
    f, t, e = synthetic()
    fit = fit_energy_model(clocks_hz=f, times_s=t, energies_j=e)
    assert isinstance(fit, EnergyFit)
    assert fit.kappa == pytest.approx(KAPPA, rel=0.03)
    assert fit.static_power_w == pytest.approx(P0, rel=0.1)
    assert fit.n_samples == 40 and len(fit.residuals_j) == 40
    assert fit.relative_rmse < 0.03 and fit.r_squared > 0.99
    assert np.allclose(np.array(fit.residuals_j), e - fit.predict_energy_j(f, t))
    with pytest.raises(AttributeError):
        fit.kappa = 1.0  # frozen


def test_exact_without_noise_and_kappa_only():
    f, t, e = synthetic(noise=0.0)
    fit = fit_energy_model(clocks_hz=f, times_s=t, energies_j=e)
    assert fit.kappa == pytest.approx(KAPPA, rel=1e-8) and fit.static_power_w == pytest.approx(P0, rel=1e-6)
    e0 = KAPPA * f ** 3 * t
    fit0 = fit_energy_model(clocks_hz=f, times_s=t, energies_j=e0, fit_static_power=False)
    assert fit0.kappa == pytest.approx(KAPPA, rel=1e-10) and fit0.static_power_w == 0.0


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="clocks_hz"):
        fit_energy_model(clocks_hz=[-1.0, 2.0], times_s=[1.0, 1.0], energies_j=[1.0, 1.0])
    with pytest.raises(ValueError, match="lengths"):
        fit_energy_model(clocks_hz=[1.0, 2.0], times_s=[1.0], energies_j=[1.0, 1.0])
    with pytest.raises(ValueError, match="number of samples"):
        fit_energy_model([ClockSample(1e9, 1.0, 5.0)])


def test_sweep_through_emulated_backend_recovers_its_parameters():
    gpu = EmulatedBackend(kappa=KAPPA, f_min_hz=210e6, f_max_hz=2535e6, step_hz=15e6, static_power_w=P0)
    samples = sweep_clocks(gpu, lambda: gpu.run_cycles(2e10), [300e6, 800e6, 1.4e9, 2.0e9, 2.5e9], repeats=2)
    assert len(samples) == 10
    assert samples[0].requested_hz == 300e6 and samples[0].clock_hz == pytest.approx(300e6)
    assert samples[2].cycles == pytest.approx(2e10)
    fit = fit_energy_model(samples)
    assert fit.kappa == pytest.approx(KAPPA, rel=1e-8) and fit.static_power_w == pytest.approx(P0, rel=1e-6)
    assert not gpu.is_locked


def test_sweep_on_real_backend_needs_opt_in(monkeypatch):
    from tests.fakes.fake_pynvml import FakeNVML

    monkeypatch.delenv("SPLITLORA_ALLOW_CLOCK_CONTROL", raising=False)
    fake = FakeNVML()
    with pytest.raises(ClockControlNotAllowedError):
        sweep_clocks(NVMLBackend(pynvml_module=fake), lambda: None, [1e9])
    assert "nvmlDeviceSetGpuLockedClocks" not in fake.names()

"""Emulated GPU backend: clock table, nearest-clock locking, and energy == the model's formula."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from splitlora.gpu import EmulatedBackend, GPUBackendError, get_gpu_backend

KAPPA = 2.0e-27  # W/Hz^3 (arbitrary test value)


def make(**kw):
    args = dict(kappa=KAPPA, f_min_hz=210e6, f_max_hz=2535e6, step_hz=15e6)
    args.update(kw)
    return EmulatedBackend(**args)


def test_clock_table_is_sorted_and_spans_range():
    gpu = make()
    clocks = gpu.supported_clocks_mhz()
    assert clocks == sorted(clocks)
    assert clocks[0] == pytest.approx(210.0) and clocks[-1] == pytest.approx(2535.0)
    assert np.allclose(np.diff(clocks), 15.0)
    assert gpu.current_clock_mhz() == pytest.approx(2535.0)  # default: f_max


def test_f_max_kept_when_off_grid():
    gpu = make(f_min_hz=100e6, f_max_hz=1050e6, step_hz=100e6)
    assert gpu.supported_clocks_mhz()[-2:] == [1000.0, 1050.0]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(cycles=st.floats(1e3, 1e13), freq_hz=st.floats(210e6, 2535e6), p0=st.floats(0, 200))
def test_energy_equals_model_formula(cycles, freq_hz, p0):
    gpu = make(static_power_w=p0)
    with gpu.locked_clock(freq_hz) as lock, gpu.energy_window() as w:
        gpu.run_cycles(cycles)
    f = lock.target_mhz * 1e6  # the supported clock actually applied
    assert abs(f - freq_hz) <= 7.5e6 + 1
    t = cycles / f
    expected = KAPPA * cycles * f ** 2 + p0 * t  # system model: E = kappa * cycles * f^2 (+ P0 t)
    assert w.measurement.time_s == pytest.approx(t, rel=1e-12)
    assert w.measurement.energy_j == pytest.approx(expected, rel=1e-12)
    assert gpu.current_clock_mhz() == pytest.approx(2535.0)  # restored


def test_lower_clock_saves_energy_costs_time():
    gpu = make()
    lo, hi = gpu.predict(1e10, 500e6), gpu.predict(1e10, 2000e6)
    assert lo.energy_j < hi.energy_j and lo.time_s > hi.time_s


def test_nearest_clock_tie_goes_low_and_bad_hz_rejected():
    gpu = make(f_min_hz=100e6, f_max_hz=300e6, step_hz=100e6)
    assert gpu.nearest_supported_clock_mhz(150e6) == 100.0
    assert gpu.nearest_supported_clock_mhz(400e6) == 300.0  # above the table: clamped to f_max
    with pytest.raises(ValueError, match="freq_hz=1500"):
        gpu.nearest_supported_clock_mhz(1500)  # MHz passed as Hz
    with pytest.raises(ValueError, match="freq_hz"):
        gpu.nearest_supported_clock_mhz(float("nan"))


def test_bad_constructor_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="kappa"):
        make(kappa=-1.0)
    with pytest.raises(ValueError, match="f_min_hz"):
        make(f_min_hz=3e9)


def test_restores_after_exception_and_refuses_nesting():
    gpu = make()
    with pytest.raises(RuntimeError, match="boom"):
        with gpu.locked_clock(1e9):
            assert gpu.current_clock_mhz() == pytest.approx(1005.0)
            raise RuntimeError("boom")
    assert gpu.current_clock_mhz() == pytest.approx(2535.0) and not gpu.is_locked
    with gpu.locked_clock(1e9):
        with pytest.raises(GPUBackendError, match="already locked"):
            with gpu.locked_clock(2e9):
                pass
    assert not gpu.is_locked


def test_windows_by_name_and_idle():
    gpu = make(static_power_w=10.0)
    gpu.begin_window("outer")
    a = gpu.run_cycles(1e9)
    gpu.begin_window("inner")
    b = gpu.run_cycles(2e9)
    inner = gpu.end_window("inner")
    gpu.idle(0.5)
    outer = gpu.end_window("outer")
    assert inner.energy_j == pytest.approx(b.energy_j)
    assert outer.energy_j == pytest.approx(a.energy_j + b.energy_j)
    assert outer.time_s == pytest.approx(a.time_s + b.time_s + 0.5)
    with pytest.raises(GPUBackendError, match="not begun"):
        gpu.end_window("outer")


def test_factory_emulated_ignores_opt_in():
    gpu = get_gpu_backend("emulated", kappa=KAPPA, f_min_hz=210e6, f_max_hz=2535e6, step_hz=15e6)
    assert gpu.clock_control_allowed
    with gpu.locked_clock(1.2e9) as lock:
        assert math.isclose(lock.applied_hz, 1.2e9, rel_tol=0.01)

"""The hand-worked example of docs/model.md ("Worked example") against the code, number by number."""
from __future__ import annotations

import math

import numpy as np
import pytest

from splitlora import load_channel, load_device, load_server
from splitlora.model.scenario import Scenario

# inputs as written in docs/model.md
F_D = 2.065074e12 + 2.111312e12
F_S = 3.140963e12 + 3.213172e12
S_BYTES = 4 * 512 * 2048 * 2
A_PARAMS = 8 * 8 * (2 * (2048 + 2048) + 2 * (2048 + 512))
P_D = 0.4 * 768 * 1.1e9
CYCLES = F_S / (0.4 * 8704)
RATE = 20e6 * math.log2(1 + 10 ** 1.5)
KAPPA = 165 / 2.535e9 ** 3
F = 1.5e9
I = 10


def test_inputs_match_profile_and_hardware():
    p = Scenario().profile()
    assert p.device_fwd_flops[16] + p.device_bwd_flops[16] == pytest.approx(F_D, rel=1e-6)
    assert p.server_fwd_flops[16] + p.server_bwd_flops[16] == pytest.approx(F_S, rel=1e-6)
    assert p.smashed_bytes[16] == S_BYTES and p.grad_bytes[16] == S_BYTES
    assert p.device_lora_params[16] == A_PARAMS
    assert load_device("Device 3").flops_per_s == pytest.approx(P_D)
    assert load_channel().rate_bps("Normal") == pytest.approx(RATE)
    assert load_server().kappa == pytest.approx(KAPPA)


def test_round_delay_and_energy_by_hand():
    # the document's arithmetic, step by step
    t_d, t_l, t_s = F_D / P_D, (8 * (S_BYTES + 4 * 512 * 8) + 8 * S_BYTES) / RATE, CYCLES / F
    assert (t_d, t_l, t_s) == pytest.approx((12.35910, 1.336057, 1.216708), rel=1e-5)
    handover = 2 * 8 * A_PARAMS * 12 / RATE
    assert handover == pytest.approx(1.626731, rel=1e-5)
    T = I * (t_d + t_l + t_s) + handover
    E = I * KAPPA * CYCLES * F ** 2
    assert T == pytest.approx(150.7454, rel=1e-6) and E == pytest.approx(415.920, rel=1e-5)
    # and the code agrees
    model = Scenario().cost_model()
    T_code, E_code = model.evaluate(np.array([16]), np.array([F]), np.array([P_D]), np.array([RATE]),
                                    np.array([RATE]))
    assert T_code[0] == pytest.approx(T, rel=1e-6)
    assert E_code[0] == pytest.approx(E, rel=1e-6)

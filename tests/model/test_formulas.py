"""Each cost formula is written once (splitlora.model.system) and every caller gives its numbers."""
from __future__ import annotations

import pathlib
import re

import numpy as np

import splitlora
from splitlora.gpu import EmulatedBackend
from splitlora.model.system import compute_energy_j, compute_time_s
from tests.helpers import random_instance


def test_energy_formula_against_a_hand_computation():
    C, f, kappa, p0 = 3e9, 1.5e9, 2e-27, 12.0
    assert compute_energy_j(C, f, kappa, p0) == kappa * C * f ** 2 + p0 * C / f
    assert compute_time_s(C, f) == C / f
    assert compute_energy_j(0.0, f, kappa, p0) == 0.0 and compute_time_s(0.0, 0.0) == 0.0


def test_cost_model_card_and_emulated_backend_agree_with_the_formula():
    model, P, Ru, Rd, M, w = random_instance(7, static_power=True)
    c = np.arange(model.n_cuts)
    f = np.full(c.shape, model.f_max_hz * 0.8)
    cyc = model.iterations * model.server_cycles[c]
    np.testing.assert_allclose(model.server_energy_j(c, f), cyc * (model.kappa * f ** 2) + model.static_power_w * cyc / f,
                               rtol=1e-12)
    d = splitlora.card(model, P, Ru, Rd, M, w)
    ok = d.feasible & (d.cut_layer < model.n_cuts)
    want = model.server_energy_j(d.cut_layer[ok], d.frequency_hz[ok])
    np.testing.assert_allclose(d.energy_j[ok], want, rtol=1e-12)
    gpu = EmulatedBackend(kappa=model.kappa, f_min_hz=model.f_min_hz, f_max_hz=model.f_max_hz, step_hz=1e6,
                          static_power_w=model.static_power_w)
    m = gpu.predict(1e9, 1.2e9)
    assert m.energy_j == compute_energy_j(1e9, 1.2e9, model.kappa, model.static_power_w)


def test_the_energy_formula_appears_in_one_place():
    """No module other than model/system.py spells kappa * cycles * f ** 2."""
    root = pathlib.Path(splitlora.__file__).parent
    pattern = re.compile(r"kappa\s*\*[^\n#]*\*\*\s*2")
    where = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if pattern.search(re.sub(r'"""[\s\S]*?"""', "", p.read_text()))]
    assert where == ["model/system.py"], where

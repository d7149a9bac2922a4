"""The channel_dynamics notebook's table: regrets from the policies' round objectives, their limits."""
import numpy as np
import pytest

from splitlora.experiments.channel_dynamics import policy_regret
from splitlora.model.channel import minibatch_rates_bps
from splitlora.model.dynamics import dynamic_policies
from splitlora.model.scenario import Scenario


def test_policy_regret_table():
    sc = Scenario(granularity="block", steps_per_round=5)
    table = policy_regret(sc, coherence_steps=(1, 5, 15), rounds=12, seed=3)
    assert len(table) == 2 * 3 * 5
    assert (table.regret >= -1e-12).all() and (table[table.policy == "oracle"].relative_regret == 0).all()
    whole = table[(table.process == "Markov") & (table.coherence_steps % 5 == 0)]
    assert (whole[whole.policy.isin(["first state", "per-mini-batch clock"])].regret.abs() < 1e-12).all()
    # one row recomputed from the policies' own decisions
    R, e = minibatch_rates_bps("Rayleigh", 12, 5, len(sc.devices), 1, seed=3)
    P, M = sc.device_arrays()
    res = dynamic_policies(sc.cost_model(), P, M, R, e, sc.w, discrete_clocks=True)
    u, o = res["first state"].objective, res["oracle"].objective
    row = table[(table.process == "Rayleigh") & (table.coherence_steps == 1) & (table.policy == "first state")].iloc[0]
    assert row.relative_regret == pytest.approx((u - o).sum() / o.sum(), rel=1e-12) and row.relative_regret > 0
    assert row.delay_vs_oracle == pytest.approx(res["first state"].delay_s.sum() / res["oracle"].delay_s.sum() - 1)
    assert row.coherence_rounds == 0.2 and np.isfinite(table.energy_vs_oracle).all()

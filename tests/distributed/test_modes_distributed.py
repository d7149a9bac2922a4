"""The parallel training modes as processes (issue 13): ``splitfed`` (SFL-V2), ``splitfed_v1`` and ``fedlora`` with
2 devices give the losses and adapter of ``run_in_process`` (``SplitTrainer.run(mode=...)``); a device killed mid-round
is left out of that round's average, logged, and the run is incomplete; a server killed mid-round (splitfed, fedlora)
resumes from its round-end checkpoint as if uninterrupted. Tiny Llama (H = 32, 2 blocks = 4 sublayer units), 3 processes per run,
harness of tests/distributed/harness.py."""
from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from splitlora.distributed import config, launch, plan
from tests.distributed.harness import Cluster, assert_same_as_in_process, base_config, write_config

TWO = ["Device 3", "Device 5"]


def _run(tmp_path, cfg, kill=None, restart=False):
    """Server and 2 devices; ``kill``: {rank: global step it is SIGKILLed at}; ``restart``: start a killed rank
    again (once)."""
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 3)
    for r in range(3):
        cl.start(r, kill_at=(kill or {}).get(r))

    def on_exit(rank, code):
        if restart and code == -signal.SIGKILL and cl.lives[rank] == 1:
            cl.start(rank)

    codes = cl.wait(on_exit=on_exit)
    return codes, cl


def test_fingerprint_of_the_default_mode_is_unchanged_and_modes_differ(tmp_path):
    cfg = base_config(tmp_path)
    fp = config.config_from_dict(cfg).fingerprint()
    assert config.config_from_dict({**cfg, "mode": "sequential"}).fingerprint() == fp
    fps = {config.config_from_dict({**cfg, "mode": m}).fingerprint() for m in ("splitfed", "splitfed_v1", "fedlora")}
    assert len(fps) == 3 and fp not in fps


def test_parallel_modes_plan_their_cuts(tmp_path):
    """fedlora: c = L for every device; splitfed and splitfed_v1 with cut: card: the parallel schedule's CARD, not
    the sequential one, scaled to the trained model's units."""
    base = base_config(tmp_path, devices=TWO, cut="card", card_scenario={"granularity": "sublayer"}, rounds=3)
    fl = plan.RunPlan.build(config.config_from_dict({**base, "mode": "fedlora"}))
    assert fl.planned_cuts() == [[fl.num_units] * 2] * 3
    sf = plan.RunPlan.build(config.config_from_dict({**base, "mode": "splitfed"}))
    assert sf.cost_model.parallel
    from splitlora.model.parallel import card_parallel

    P = [plan.device_profile(sf.config, m) for m in range(2)]
    for n, row in enumerate(sf.planned_cuts()):
        d = card_parallel(sf.cost_model, [[p[0] for p in P]], [sf.rates_bps[n]], [sf.rates_bps[n]],
                          [[p[1] for p in P]], sf.config.w, discrete_clocks=True)
        assert row == [round(max(int(c), 0) * sf.num_units / sf.cost_model.n_cuts) for c in d.cut_layer[0]]
    # the dry run shows the same plan, with the parallel schedule's clock shares (summing to <= f_max per round)
    plan_df = launch.dry_run(sf.config)
    assert plan_df["cut_layer"].tolist() == [c for row in sf.planned_cuts() for c in row]
    assert (plan_df.groupby("round")["clock_ghz"].sum() * 1e9 <= sf.cost_model.f_max_hz * (1 + 1e-9)).all()
    # SFL-V1 has the same schedule (a copy per device changes what the server trains, not its work): the same plan
    v1 = plan.RunPlan.build(config.config_from_dict({**base, "mode": "splitfed_v1"}))
    assert v1.cost_model.parallel and v1.planned_cuts() == sf.planned_cuts()
    assert launch.dry_run(v1.config).equals(plan_df)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["splitfed", "splitfed_v1"])
def test_splitfed_two_devices_heterogeneous_cuts_equal_in_process(tmp_path, mode):
    """splitfed (SFL-V2) and splitfed_v1 (SFL-V1), 2 devices at different cuts (1 and 3, then 2 and 2): devices in
    parallel, one server-side adapter (V1: a copy per device, averaged too), FedAvg of each matrix over its
    holders: losses and adapter as in-process."""
    cfg = base_config(tmp_path, devices=TWO, cut=[[1, 3], [2, 2]], mode=mode)
    codes, cl = _run(tmp_path, cfg)
    assert codes == {0: 0, 1: 0, 2: 0}, cl.logs()
    logs, ref = assert_same_as_in_process(cfg)
    assert [(x["round"], x["device"]) for x in logs] == [(n, m) for n in range(2) for _ in range(2) for m in range(2)]
    events = json.loads((Path(cfg["dist"]["output_dir"]) / "events.json").read_text())
    assert [e["devices"] for e in events if e["event"] == "round_done"] == [[0, 1], [0, 1]]
    # the sequential mode and the other SplitFed variant of the same file train something else: the comparison
    # can fail (V1 and V2 differ where both devices' smashed data reach one server-side matrix: unit 3 in round 0)
    for other in ("sequential", "splitfed_v1" if mode == "splitfed" else "splitfed"):
        alt = plan.run_in_process(config.config_from_dict({**cfg, "mode": other})).adapter_state()
        assert any(not torch.equal(alt[k], v) for k, v in ref.adapter_state().items()), other


@pytest.mark.slow
def test_fedlora_two_devices_equal_in_process_across_a_server_restart(tmp_path):
    """fedlora: each device trains the whole LoRA model (c = L, only its losses cross the link), the server
    averages the adapters: losses and adapter as in-process. The server is killed in round 1 and restarted
    (:func:`_assert_resumed`): the devices over memory are named once, not again after the resume."""
    cfg = base_config(tmp_path, devices=TWO, cut="card", mode="fedlora", card_scenario={"granularity": "sublayer"},
                      dist={"join_timeout_s": 60})
    logs, events = _assert_resumed(cfg, *_run(tmp_path, cfg, kill={0: 6}, restart=True))
    assert {x["cut_layer"] for x in logs} == {4} and all(x["bytes_up"] == 0 for x in logs)
    # the devices that could not hold the whole model (of the planning scenario, Llama-3.2-1B) are named
    rc = config.config_from_dict(cfg)
    need = plan.RunPlan.build(rc).cost_model.device_memory_bytes[-1]
    over = [m for m in range(2) if plan.device_profile(rc, m)[1] < need]
    assert over  # else the check below could not fail
    assert sorted(e["device"] for e in events if e["event"] == "exceeds_memory") == over


@pytest.mark.slow
def test_splitfed_device_killed_mid_round_is_left_out_and_logged(tmp_path):
    """Device 1 is killed after sending the smashed data of its second mini-batch of round 0 (its nominal step
    2 + 1 = 3): the server keeps the updates it applied, leaves it out of round 0's average (``left_out``) and,
    as it does not come back, skips it in round 1; the run is incomplete (exit 1) and what it trained, in
    ``incomplete/``, equals run_in_process with the same losses. Round 0's device-side matrices are device 0's
    alone (the average of one)."""
    cfg = base_config(tmp_path, devices=TWO, cut=[[2, 2], [2, 2]], mode="splitfed",
                      dist={"timeout_s": 3, "join_timeout_s": 4})
    codes, cl = _run(tmp_path, cfg, kill={2: 3})
    assert codes[0] == 1 and codes[1] == 0 and codes[2] != 0, cl.logs()
    out = Path(cfg["dist"]["output_dir"])
    assert not (out / "adapter.pt").exists()
    events = json.loads((out / "incomplete" / "events.json").read_text())
    left = [e for e in events if e["event"] == "left_out"]
    assert [(e["round"], e["device"]) for e in left] == [(0, 1)], events
    assert [(e["round"], e["device"]) for e in events if e["event"] == "skipped"] == [(1, 1)]
    assert [e["devices"] for e in events if e["event"] == "round_done"] == [[0], [0]]
    adapter = torch.load(out / "incomplete" / "adapter.pt", weights_only=True)
    logs = json.loads((out / "incomplete" / "logs.json").read_text())
    k = left[0]["steps"]  # 2 when its last smashed data arrived before the connection closed (the usual case)
    assert k in (1, 2)
    assert [(x["round"], x["device"]) for x in logs] == [(0, 0), (0, 1), (0, 0), (0, 1)][:2 + k] + [(1, 0)] * 2
    assert "left_out" in cl.logs() and f"trained {4 + k} of its 8 mini-batches" in cl.logs()
    ref = plan.run_in_process(config.config_from_dict(cfg), lost={(0, 1): k, (1, 1): 0})
    want = ref.adapter_state()
    for key in want:
        torch.testing.assert_close(adapter[key], want[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor([x["loss"] for x in logs]), torch.tensor([x.loss for x in ref.logs]),
                               rtol=0, atol=1e-6)
    # averaging device 1's lost adapter in would have given another result
    full = plan.run_in_process(config.config_from_dict(cfg)).adapter_state()
    assert any(not torch.equal(full[key], want[key]) for key in want)


@pytest.mark.parametrize("mode", ["splitfed", "splitfed_v1", "fedlora"])
def test_device_absent_every_round_is_the_run_without_it(tmp_path, mode):
    """In-process rule of the server: a device left out of every round (``skip``) gives exactly the run of the
    other device alone (the same data: random tokens seeded per device index)."""
    two = config.config_from_dict(base_config(tmp_path, devices=TWO, cut=[[2, 2], [2, 2]], mode=mode))
    one = config.config_from_dict(base_config(tmp_path, cut=[[2], [2]], mode=mode))
    a = plan.run_in_process(two, skip=[(0, 1), (1, 1)])
    b = plan.run_in_process(one)
    assert [x.loss for x in a.logs] == [x.loss for x in b.logs]
    want = b.adapter_state()
    assert all(torch.equal(v, want[k]) for k, v in a.adapter_state().items())
    c = plan.run_in_process(two)  # and the run with both differs
    assert any(not torch.equal(v, want[k]) for k, v in c.adapter_state().items())


def _assert_resumed(cfg: dict, codes: dict, cl) -> tuple[list, list]:
    """A run whose server was SIGKILLed (``_run(kill={0: 6}, restart=True)``: in round 1, before it applied global
    step 6, device 0's second mini-batch) and restarted: it resumed from its checkpoint of round 0's end, the
    devices rejoined by themselves and round 1 ran again from its start. Losses and adapter equal the uninterrupted
    in-process run (1e-6); the logs hold every step once (no row of the lost partial round, none missing), as do
    the checkpoint's JSONL logs; round_done and turn_done once per round (and device). Returns (logs, events)."""
    assert cl.lives == {0: 2, 1: 1, 2: 1} and codes == {0: 0, 1: 0, 2: 0}, cl.logs()
    logs, _ = assert_same_as_in_process(cfg)
    rounds, steps = cfg["rounds"], cfg["rounds"] * 2 * cfg["steps_per_round"]
    assert [x["step"] for x in logs] == list(range(steps))
    ck = [json.loads(x) for x in (Path(cfg["dist"]["checkpoint_dir"]) / "server.logs.jsonl").read_text().splitlines()]
    assert ck == logs
    events = json.loads((Path(cfg["dist"]["output_dir"]) / "events.json").read_text())
    kinds = Counter(e["event"] for e in events)
    assert kinds["resumed"] == 1 and not kinds["left_out"] and not kinds["skipped"], events
    assert [e["round"] for e in events if e["event"] == "round_done"] == list(range(rounds))
    assert [(e["round"], e["device"]) for e in events if e["event"] == "turn_done"] == \
        [(n, m) for n in range(rounds) for m in range(2)]
    return logs, events


@pytest.mark.slow
def test_splitfed_server_killed_mid_round_resumes_as_uninterrupted(tmp_path):
    """splitfed, 3 rounds at heterogeneous cuts: the server is killed in round 1 and restarted
    (:func:`_assert_resumed`); the resumed server rewrites its JSONL files at round 1's end and appends round 2."""
    cfg = base_config(tmp_path, devices=TWO, rounds=3, cut=[[1, 3], [2, 2], [3, 1]], mode="splitfed",
                      dist={"join_timeout_s": 60})
    _assert_resumed(cfg, *_run(tmp_path, cfg, kill={0: 6}, restart=True))

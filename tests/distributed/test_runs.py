"""Split training over torch.distributed, as processes (issue 5): the same result as in-process, GSM8K data, an
emulated and a tc-shaped veth link, NCCL (stand-in and real), measured rates, faults (device killed, restarted; server
restarted). ``python -m splitlora.distributed`` with RANK / WORLD_SIZE on 127.0.0.1 (or in the test's own network
namespaces), every wait bounded. Tiny Llama (H = 32, 2 blocks), 2-3 processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from splitlora.distributed import config, launch, plan, wire
from splitlora.model.hardware import CHANNEL_STATES, load_channel
from tests.distributed.harness import B, Cluster, H, S, assert_same_as_in_process, base_config, results, write_config


def _watch_listeners(cl: Cluster, found: set, done: threading.Event) -> None:
    """Collect the TCP listening addresses of the cluster's processes (``ss -ltnp``) until ``done``."""
    while not done.is_set() and shutil.which("ss"):
        pids = {p.pid for p in cl.procs.values()}
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if any(f"pid={pid}," in line for pid in pids):
                found.add(line.split()[3])
        time.sleep(0.2)


def test_two_processes_equal_in_process_with_card(tmp_path):
    """Server + 1 device, CARD picks the cut each round from the device's reported profile: same losses and
    adapters as SplitTrainer; bytes of the smashed data = B s H x 4 (fp32 wire)."""
    cfg = base_config(tmp_path, cut="card", card_scenario={"granularity": "sublayer"},
                      link={"condition": "Markov", "seed": 1})
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 2)
    for r in range(2):
        cl.start(r)
    listening, done = set(), threading.Event()
    watcher = threading.Thread(target=_watch_listeners, args=(cl, listening, done), daemon=True)
    watcher.start()
    codes = cl.wait()
    done.set()
    watcher.join(10)
    assert codes == {0: 0, 1: 0}, cl.logs()
    out = Path(cfg["dist"]["output_dir"])
    assert "[splitlora] run complete: 2 rounds, 4 mini-batches of 1 devices; smashed-data up-link" in cl.logs()
    assert f"adapter written to {out / 'adapter'}" in cl.logs()
    if shutil.which("ss"):  # the store and both gloo endpoints listen on loopback only
        assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening
    logs, _ = assert_same_as_in_process(cfg)
    assert [x["cut_layer"] for x in logs] == [0] * 4  # Device 3 offloads everything (plan.planned_cuts)
    assert all(x["smashed_bytes"] == B * S * H * 4 == x["model_smashed_bytes"] for x in logs)
    assert all(x["bytes_up"] == B * S * (H * 4 + 8) and x["bytes_down"] == 0 for x in logs)
    assert all(x["pred_up_s"] == pytest.approx(8 * B * S * H * 4 / x["rate_up_bps"]) for x in logs)
    assert (Path(cfg["dist"]["output_dir"]) / "adapter" / "adapter_config.json").exists()


def test_gsm8k_jsonl_data_two_processes_equal_in_process(tmp_path):
    """``data``: a GSM8K-format JSONL file (written here) instead of random tokens. Every device's mini-batches
    are its shard of the file's records, tokenised and right-padded to s; server + 1 device give the same losses
    and adapter as SplitTrainer on the same batches."""
    from splitlora.training.models import byte_tokenizer

    s = 90  # the first records are padded, the last truncated
    records = [{"question": f"Ann has {a} pens and buys {a + 1} more. How many?",
                "answer": f"{a} + {a + 1} = <<{a}+{a + 1}={2 * a + 1}>>{2 * a + 1}\n#### {2 * a + 1}"}
               for a in range(2, 11)]  # 9 records, 8 used (1 device x 4 batches x B = 2)
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = base_config(tmp_path, data=str(path), seq_len=s)
    rc = config.config_from_dict(cfg)
    batches = plan.device_batches(rc, 259)[0]
    assert len(batches) == 4 and all(b["input_ids"].shape == (B, s) for b in batches)
    first = byte_tokenizer().decode(batches[0]["input_ids"][0][batches[0]["attention_mask"][0] == 1])
    assert first == "Question: " + records[0]["question"] + "\nAnswer: " + records[0]["answer"] + "</s>"
    assert (batches[0]["labels"] == -100).any()  # short records are padded, padding is not trained on
    assert rc.fingerprint() != config.config_from_dict(base_config(tmp_path, seq_len=s)).fingerprint()
    with pytest.raises(ValueError, match="must hold 16"):
        plan.device_batches(config.config_from_dict(base_config(tmp_path, data=str(path), batches_per_device=8)), 259)
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 2)
    for r in range(2):
        cl.start(r)
    assert cl.wait() == {0: 0, 1: 0}, cl.logs()
    logs, _ = assert_same_as_in_process(cfg)
    assert [x["cut_layer"] for x in logs] == [1, 1, 3, 3]


def test_three_processes_two_devices_emulated_link(tmp_path):
    """Server + 2 devices taking turns, cuts changing every turn (incl. device-only), bfloat16 wire, link
    emulated at each round's Markov channel state: same result as SplitTrainer; bytes = B s H x 2; measured
    transfer time of the smashed data and its gradient within 10% of bits / rate."""
    s = 64  # 8 KiB of bf16 smashed data: 160 ms (Good) to 630 ms (Poor) at rate_scale 2.5e-3
    cfg = base_config(tmp_path, devices=["Device 3", "Device 5"], rounds=2, cut=[[1, 2], [3, 4]],
                      train={"wire_dtype": "bfloat16"}, seq_len=s,
                      link={"condition": "Markov", "seed": 1, "emulate": True, "rate_scale": 2.5e-3})
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 3)
    for r in range(3):
        cl.start(r)
    codes = cl.wait()
    assert codes == {0: 0, 1: 0, 2: 0}, cl.logs()
    logs, _ = assert_same_as_in_process(cfg)
    sent = [x for x in logs if x["cut_layer"] < 4]
    assert len(sent) == 6 and {x["channel_state"] for x in sent} == set(CHANNEL_STATES)
    assert all(x["smashed_bytes"] == B * s * H * 2 == x["model_smashed_bytes"] == x["bytes_down"] for x in sent)
    for x in sent:
        assert abs(x["t_up_s"] / x["pred_up_s"] - 1) < 0.10, x
        assert abs(x["t_down_s"] / x["pred_down_s"] - 1) < 0.10, x


def test_launch_local_replaces_a_busy_port_and_stops_devices_when_the_server_fails(tmp_path, capfd):
    """--local: a configured port that is in use is replaced by a free one; a server that fails at start (here: a
    checkpoint of another configuration) makes launch_local stop the devices at once instead of letting them
    wait ``startup_timeout_s`` (120 s) for it."""
    cfg = base_config(tmp_path, rounds=1, cut=[[1]])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", cfg["dist"]["port"]))
        busy.listen(1)
        codes = launch.launch_local(write_config(tmp_path, cfg), extra_env={"OMP_NUM_THREADS": "1"}, timeout_s=120,
                               log_path=tmp_path / "ok.log")
    assert codes == [0, 0], (tmp_path / "ok.log").read_text()[-3000:]
    assert f"dist.port={cfg['dist']['port']} is in use on 127.0.0.1" in capfd.readouterr().err
    assert len(results(cfg)[1]) == 2

    other = base_config(tmp_path, train={"lr": 0.5})  # another fingerprint; the first run's server checkpoint
    other["dist"]["checkpoint_dir"] = str(tmp_path / "ck2")
    (tmp_path / "ck2").mkdir()
    shutil.copy(tmp_path / "ck" / "server.pt", tmp_path / "ck2" / "server.pt")
    t0 = time.monotonic()
    codes = launch.launch_local(write_config(tmp_path, other), extra_env={"OMP_NUM_THREADS": "1"}, timeout_s=120,
                           log_path=tmp_path / "fail.log")
    assert codes[0] == 2 and codes[1] == -signal.SIGKILL and time.monotonic() - t0 < 60
    assert "made with another version or configuration" in (tmp_path / "fail.log").read_text()
    assert "the server exited with code 2: stopping the devices" in capfd.readouterr().err


def test_nccl_path_with_a_gloo_stand_in_equals_in_process(tmp_path):
    """backend: nccl with SPLITLORA_FAKE_NCCL (every rank "capable", a second gloo group in place of NCCL): the pair
    negotiates the two-group transport, and losses and adapter equal the in-process run."""
    cfg = base_config(tmp_path, dist={"backend": "nccl"}, train={"wire_dtype": "bfloat16"})
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 2)
    for r in range(2):
        cl.start(r, env={wire.FAKE_NCCL_ENV: "1"})
    assert cl.wait() == {0: 0, 1: 0}, cl.logs()
    assert_same_as_in_process(cfg)
    joined = [e for e in results(cfg)[2] if e["event"] == "joined"]
    assert [e["transport"] for e in joined] == ["nccl"]


@pytest.mark.skipif(not (torch.distributed.is_nccl_available() and torch.cuda.device_count() >= 2),
                    reason="needs two CUDA GPUs and an NCCL build of torch (NCCL refuses two ranks on one GPU)")
def test_real_nccl_pair_on_two_gpus_matches_in_process(tmp_path):
    """Server on cuda:0, device on cuda:1 (LOCAL_RANK), payloads over a real NCCL pair group; GPU vs CPU
    arithmetic, so equal to the in-process CPU run within 1e-4 rather than bit for bit. Not run on CPU hosts."""
    cfg = base_config(tmp_path, dist={"backend": "nccl", "device": "cuda"})
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 2)
    for r in range(2):
        cl.start(r, env={"LOCAL_RANK": str(r)})
    assert cl.wait() == {0: 0, 1: 0}, cl.logs()
    assert_same_as_in_process(cfg, atol=1e-4)
    assert [e["transport"] for e in results(cfg)[2] if e["event"] == "joined"] == ["nccl"]


def test_device_that_cannot_use_nccl_is_refused(tmp_path):
    """Server with backend: nccl (capable through the stand-in); a device whose host cannot use NCCL joins with
    backend: auto (``dist`` is not part of the fingerprint): the server refuses it with the reason and skips its
    turns, the device exits with that reason, nothing is trained, so nothing is written and the server exits 1."""
    cfg = base_config(tmp_path, dist={"backend": "nccl", "startup_timeout_s": 45})  # the refused device never comes
    dev_cfg = tmp_path / "device.json"
    dev_cfg.write_text(json.dumps({**cfg, "dist": {**cfg["dist"], "backend": "auto"}}))
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 2)
    cl.start(0, env={wire.FAKE_NCCL_ENV: "1"})
    cl.start(1, cfg_path=dev_cfg)
    codes = cl.wait()
    assert codes[0] == 1 and codes[1] != 0, cl.logs()  # the server trained nothing: exit 1, nothing written
    assert "refused this device" in cl.logs() and "trained 0 of its 4 mini-batches" in cl.logs()
    assert not (Path(cfg["dist"]["output_dir"]) / "adapter.pt").exists()
    ck = Path(cfg["dist"]["checkpoint_dir"])
    events = [json.loads(x) for x in (ck / "server.events.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["event"] == "join_refused"]
    assert refused and "the device cannot use NCCL" in refused[0]["reason"]
    assert not (ck / "server.logs.jsonl").read_text() and [e["round"] for e in events if e["event"] == "skipped"] == [0, 1]


def test_card_with_measured_rates(tmp_path):
    """link.rate_source: measured: CARD gets, for each turn, the up-link rate the server measured in that device's
    previous turn (bits of smashed data / their transfer time / rate_scale), the model's rate in its first turn.
    Checked against the logs, against CARD recomputed here from that rate, and the training against SplitTrainer
    replaying the logged cuts."""
    scale = 0.01  # 64 KiB of smashed data: 0.32 s (Good) to 1.3 s (Poor)
    cfg = base_config(tmp_path, devices=["Device 1"], rounds=4, cut="card", seq_len=64, batch_size=4,
                      model={"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "seed": 0},
                      train={"wire_dtype": "bfloat16"}, card_scenario={"granularity": "sublayer",
                                                                         "schedule": "pipelined"},
                      link={"condition": "Markov", "seed": 5, "emulate": True, "rate_scale": scale,
                            "rate_source": "measured"})
    rc = config.config_from_dict(cfg)
    with pytest.raises(ValueError, match="rate_source='measured'"):
        plan.run_in_process(rc)
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 2)
    for r in range(2):
        cl.start(r)
    assert cl.wait() == {0: 0, 1: 0}, cl.logs()
    _, logs, _ = results(cfg)
    base = plan.build_base_model(rc)
    cm, _ = plan.cost_model(rc, base.config)
    states, model_rates = plan.channel_rates(rc)
    flops, mem = plan.device_profile(rc, 0)
    est = None
    for n in range(rc.rounds):
        turn = [x for x in logs if x["round"] == n]
        want = model_rates[n, 0] if est is None else est
        assert turn[0]["card_rate_bps"] == pytest.approx(want, rel=1e-12)
        assert turn[0]["cut_layer"] == plan.decide_cut(rc, cm, n, 0, flops, mem, want, 4)
        sent = [x for x in turn if x["smashed_bytes"] > 0]
        if sent:
            est = 8 * sum(x["smashed_bytes"] for x in sent) / sum(x["t_up_s"] for x in sent) / scale
            assert est == pytest.approx(model_rates[n, 0], rel=0.10)  # the emulated state, measured
    # Markov seed 5: Poor, Poor, Poor, Normal; in round 3 CARD still sees the Poor rate it measured in round 2
    assert any(abs(x["card_rate_bps"] / model_rates[x["round"], 0] - 1) > 0.5 for x in logs)
    cuts = [[x["cut_layer"]] for x in logs if x["step"] % 2 == 0]
    ref = plan.run_in_process(rc, cuts=cuts)
    torch.testing.assert_close(torch.tensor([x["loss"] for x in logs]), torch.tensor([x.loss for x in ref.logs]),
                               rtol=0, atol=1e-6)


NS_IP = ("10.231.77.1", "10.231.77.2")


def _netns_available() -> str | None:
    if sys.platform != "linux" or not (shutil.which("ip") and shutil.which("tc")):
        return "needs Linux with iproute2 (ip, tc)"
    name = f"slprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=20)
    if r.returncode:
        return f"'ip netns add' is not permitted here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    return None


def test_veth_shaped_to_poor_rate(tmp_path):
    """Server and device in two network namespaces joined by a veth pair shaped with tc tbf to the Poor-channel
    rate (scaled so 64 KiB of smashed data takes ~1 s): measured transfer time within 15% of bits / rate."""
    why = _netns_available()
    if why:
        pytest.skip(why)
    tag = str(os.getpid())[-6:]
    ns, veth = (f"slA{tag}", f"slB{tag}"), (f"vslA{tag}", f"vslB{tag}")
    Bn, Sn, Hn = 4, 64, 64
    bits = Bn * Sn * Hn * 4 * 8
    poor = load_channel().rate_bps("Poor")
    rate = float(bits)  # ~1 s for the smashed data
    try:
        for n in ns:
            subprocess.run(["ip", "netns", "add", n], check=True, timeout=20)
        subprocess.run(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]], check=True, timeout=20)
        for n, v, ip in zip(ns, veth, NS_IP):
            for cmd in (["ip", "link", "set", v, "netns", n],
                        ["ip", "-n", n, "addr", "add", f"{ip}/24", "dev", v],
                        ["ip", "-n", n, "link", "set", v, "up"], ["ip", "-n", n, "link", "set", "lo", "up"],
                        ["ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", v, "root", "tbf", "rate",
                         f"{int(rate)}bit", "burst", "3000", "limit", "1000000"]):
                subprocess.run(cmd, check=True, timeout=20, capture_output=True)
        cfg = base_config(tmp_path, model={"hidden_size": Hn}, batch_size=Bn, seq_len=Sn, rounds=1,
                          steps_per_round=1, cut=[[1]], link={"condition": "Poor", "rate_scale": rate / poor},
                          dist={"addr": NS_IP[0], "port": 29517})
        path = write_config(tmp_path, cfg)
        procs = []
        for r in range(2):
            cl = Cluster(tmp_path, path, 2, prefix=["ip", "netns", "exec", ns[r]])
            cl.start(r)
            procs.append(cl)
        codes = [cl.wait()[r] for r, cl in enumerate(procs)]
        assert codes == [0, 0], procs[0].logs()
        logs, _ = assert_same_as_in_process(cfg)
        x = logs[0]
        print(f"veth+tbf at {rate:.0f} bit/s: up {x['t_up_s']:.3f} s / {x['pred_up_s']:.3f} s, "
              f"down {x['t_down_s']:.3f} s / {x['pred_down_s']:.3f} s")
        assert x["smashed_bytes"] * 8 == bits and x["pred_up_s"] == pytest.approx(bits / rate)
        assert abs(x["t_up_s"] / x["pred_up_s"] - 1) < 0.15, x
        assert abs(x["t_down_s"] / x["pred_down_s"] - 1) < 0.15, x
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", veth[0]], capture_output=True, timeout=20)  # if never moved


def test_dead_device_is_skipped_and_server_state_kept(tmp_path):
    """Device 1 is SIGKILLed in the middle of its round-1 turn and never comes back: the server rolls the turn
    back, waits join_timeout_s, skips it (and at once in later rounds), and finishes with device 0. The result,
    written to ``incomplete/`` with exit code 1, equals SplitTrainer without those turns: no half-applied step, no
    lost optimiser state."""
    cfg = base_config(tmp_path, devices=["Device 3", "Device 5"], rounds=3, cut=[[1, 2], [3, 1], [2, 3]],
                      dist={"timeout_s": 3, "join_timeout_s": 4, "retries": 1})
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 3)
    cl.start(0)
    cl.start(1)
    cl.start(2, kill_at=7)  # round 1, device 1's turn = steps 6, 7: killed after sending step 7's smashed data
    codes = cl.wait()
    assert codes == {0: 1, 1: 0, 2: -signal.SIGKILL}, cl.logs()  # 1: fewer mini-batches trained than configured
    skip = [(1, 1), (2, 1)]
    out = Path(cfg["dist"]["output_dir"])
    assert not (out / "adapter.pt").exists()  # what was trained is kept apart from complete runs' outputs
    incomplete = {**cfg, "dist": {**cfg["dist"], "output_dir": str(out / "incomplete")}}
    logs, _ = assert_same_as_in_process(incomplete, skip=skip)
    _, _, events = results(incomplete)
    assert [(e["round"], e["device"]) for e in events if e["event"] == "skipped"] == skip
    assert any(e["event"] == "turn_failed" and e["device"] == 1 for e in events)


def test_device_and_server_restarts_resume_identically(tmp_path):
    """Device 1 is killed mid-turn in round 1 and restarted: it rejoins from its checkpoint (reports its last
    step) and the server retries the turn. Then the server is killed mid-turn in round 2 and restarted: it
    resumes from its checkpoint, both devices rejoin. Final adapters and losses equal an uninterrupted run."""
    cfg = base_config(tmp_path, devices=["Device 3", "Device 5"], rounds=4, cut=[[1, 2], [2, 1], [3, 1], [1, 4]],
                      dist={"join_timeout_s": 60, "retries": 1})
    cl = Cluster(tmp_path, write_config(tmp_path, cfg), 3)
    cl.start(0, kill_at=9)  # round 2, device 0's turn (steps 8, 9)
    cl.start(1)
    cl.start(2, kill_at=7)  # round 1, device 1's turn (steps 6, 7)
    restarted = []

    def on_exit(rank, code):
        if code == -signal.SIGKILL and rank not in restarted:
            restarted.append(rank)
            cl.start(rank)

    codes = cl.wait(on_exit=on_exit)
    assert restarted == [2, 0] and codes == {0: 0, 1: 0, 2: 0}, cl.logs()
    logs, _ = assert_same_as_in_process(cfg)
    assert [x["step"] for x in logs] == list(range(16))
    _, _, events = results(cfg)
    kinds = [(e["event"], e.get("device")) for e in events]
    assert ("turn_failed", 1) in kinds and ("resumed", None) in kinds and not any(k == "skipped" for k, _ in kinds)
    rejoin = [e for e in events if e["event"] == "joined" and e["device"] == 1 and e["gen"] == 2]
    assert rejoin and rejoin[0]["device_last_step"] == 3  # its checkpoint after its round-0 turn

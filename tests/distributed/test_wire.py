"""Distributed runs, in one process: tensor messages and their checks, adapter hand-over guards, the rate limiter,
configuration validation and fingerprint, transport choice, the CLI parser."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path

import pytest
import torch

from splitlora.distributed import config, launch, plan, roles, wire
from splitlora.model.hardware import CHANNEL_STATES, load_channel
from splitlora.training import node
from tests.distributed.harness import SECRET, base_config


def thread_pair(timeout_s: float = 10.0):
    """Two Links joined by a connected socket pair in this process."""
    import socket

    a, b = socket.socketpair()
    return wire.Link(a, timeout_s, peer=1), wire.Link(b, timeout_s, peer=0)


def test_messages_carry_shape_dtype_and_refuse_surprises():
    a, b = thread_pair(timeout_s=1.5)
    with cf.ThreadPoolExecutor(1) as ex:
        for t in (torch.randn(2, 3, 4), torch.randn(5).to(torch.bfloat16), torch.tensor(7.0),
                  torch.randint(0, 9, (2, 2), dtype=torch.int64), torch.ones(3, dtype=torch.bool), torch.empty(0, 4)):
            fut = ex.submit(a.send, t, wire.K_HIDDEN)
            got, _ = b.recv(wire.K_HIDDEN, t.dtype, tuple(t.shape))
            assert fut.result(10) == t.numel() * t.element_size()
            assert got.dtype == t.dtype and torch.equal(got, t)
        fut = ex.submit(a.send, torch.zeros(2, 2), wire.K_HIDDEN)
        with pytest.raises(wire.ProtocolError, match="dtype"):
            b.recv(wire.K_HIDDEN, torch.float16)
        assert fut.result(10) == 16
        b.close()  # what a role does after a ProtocolError: the peer notices at once, not at its timeout
        t0 = time.monotonic()
        with pytest.raises(wire.LinkClosed, match="closed"):
            a.recv(wire.K_GRAD)
        assert time.monotonic() - t0 < 1.0


def _tiny_node():
    from peft import get_peft_model

    cfg = config.config_from_dict(base_config(Path("/nonexistent")))
    model = get_peft_model(plan.build_base_model(cfg), plan.lora_config(cfg))
    return node.LoraNode(model, cfg.train)


def test_device_cannot_write_server_side_adapter():
    from splitlora.training.split import split_model

    lora_node = _tiny_node()
    lora_node.set_owned(list(lora_node.params))
    d_part, s_part = split_model(lora_node.model, 1, "sublayer")
    d_own, s_own = node.trainable_names(lora_node, d_part), node.trainable_names(lora_node, s_part)
    expected = {k: lora_node.params[k] for k in d_own}
    # a well-formed hand-over (values + AdamW state) is accepted
    a, b = thread_pair(timeout_s=1.5)
    pay = lora_node.export(d_own)
    pay["opt"] = {k: {"exp_avg": torch.ones_like(v), "exp_avg_sq": torch.ones_like(v), "step": torch.tensor(2.0)}
                  for k, v in pay["params"].items()}
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(wire.send_adapter, a, pay)
        got, nbytes = wire.recv_adapter(b, expected)
        assert fut.result(10) == nbytes + 3 * 8 * 4 * len(d_own)  # manifest: 3 int64 per tensor
    assert all(torch.equal(got["params"][k], pay["params"][k]) for k in d_own) and set(got["opt"]) == set(d_own)
    # a device sending a server-side name (or a wrong shape) is refused before its payload is read
    for bad in ({"params": {**lora_node.export(d_own)["params"], s_own[0]: lora_node.params[s_own[0]].detach()}, "opt": {}},
                {"params": {k: torch.zeros(3) for k in d_own}, "opt": {}}):
        a, b = thread_pair(timeout_s=1.5)
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(wire.send_adapter, a, bad)
            with pytest.raises(wire.ProtocolError, match="refused|shape"):
                wire.recv_adapter(b, expected)
            fut.result(30)  # the sender's bytes are buffered; the receiver never read the blob


@pytest.mark.parametrize("state", CHANNEL_STATES)
def test_rate_limiter_holds_channel_rate(state):
    """8 KiB at the state's rate x 2e-3 (0.2-0.8 s): receiver-measured time within 10% of bits / rate."""
    rate = load_channel().rate_bps(state) * 2e-3
    a, b = thread_pair()
    t = torch.randn(2, 16, 64)  # 8192 bytes
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(a.send, t, wire.K_HIDDEN, rate)
        got, seconds = b.recv(wire.K_HIDDEN, torch.float32, t.shape)
        fut.result(10)
    predicted = 8 * 8192 / rate
    assert torch.equal(got, t)
    assert abs(seconds / predicted - 1) < 0.10, (state, seconds, predicted)


def test_config_validation_and_fingerprint(tmp_path):
    cfg = config.config_from_dict(base_config(tmp_path))
    other = config.config_from_dict(base_config(tmp_path, dist={"port": 1234}))
    assert cfg.fingerprint() == other.fingerprint()  # where it runs is not what it computes
    assert cfg.fingerprint() != config.config_from_dict(base_config(tmp_path, train={"lr": 0.5})).fingerprint()
    with pytest.raises(ValueError, match="keys"):
        config.config_from_dict({"nonsense": 1})
    with pytest.raises(ValueError, match="cut"):
        config.config_from_dict(base_config(tmp_path, cut=[[1]]))
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        launch.run_role(cfg, 0, 3)
    # every section is checked before a process starts, with the field's name and what is allowed
    for over, msg in [({"dist": {"timout_s": 3}}, r"dist\.timout_s is invalid: .*'timeout_s'"),
                      ({"link": {"rate": 3}}, r"link\.rate is invalid: .*'rate_scale'"),
                      ({"train": {"lr_": 3}}, r"train\.lr_ is invalid: .*'lr'")]:
        with pytest.raises(ValueError, match=msg):
            config.config_from_dict(base_config(tmp_path, **over))
    for over, msg in [({"devices": ["Device 9"]}, r"devices='Device 9' is invalid: must be one of"),
                      ({"model": {"hiden_size": 8}}, r"model\.hiden_size is invalid: .*'hidden_size'"),
                      ({"lora": {"rr": 8}}, r"lora\.rr is invalid: .*'r'"),
                      ({"card_scenario": {"schedule": "pipelind"}}, r"schedule='pipelind' is invalid"),
                      ({"card_scenario": {"wieght": 1}}, r"card_scenario\.wieght is invalid: .*'w'")]:
        bad = config.config_from_dict(base_config(tmp_path, **over))
        with pytest.raises(ValueError, match=msg):
            config.check_run_config(bad)
        with pytest.raises(ValueError, match=msg):
            launch.run_role(bad, 0, 2)
    config.check_run_config(cfg)
    # CARD standing in the paper's scenario: the strong device trains alone, the weak one offloads everything
    card_cfg = config.config_from_dict(base_config(tmp_path, devices=["Device 1", "Device 3"], cut="card",
                                              card_scenario={"granularity": "sublayer"}))
    assert plan.planned_cuts(card_cfg) == [[4, 0], [4, 0]]


def test_choose_transport_device_and_backend_validation(monkeypatch):
    monkeypatch.delenv(wire.FAKE_NCCL_ENV, raising=False)
    assert wire.choose_transport("auto", True, True) == "nccl"
    assert wire.choose_transport("auto", True, False) == wire.choose_transport("auto", False, True) == "gloo"
    assert wire.choose_transport("gloo", True, True) == "gloo"
    assert wire.choose_transport("nccl", True, True) == "nccl"
    with pytest.raises(ValueError, match=r"dist.backend='nccl' is invalid for this pair: the device cannot"):
        wire.choose_transport("nccl", True, False)
    with pytest.raises(ValueError, match="the server and device cannot"):
        wire.choose_transport("nccl", False, False)
    with pytest.raises(ValueError, match=r"dist.backend='mpi' is invalid: must be one of"):
        wire.choose_transport("mpi", True, True)
    with pytest.raises(ValueError, match=r"dist.backend='mpi' is invalid"):
        config.DistConfig(backend="mpi")
    with pytest.raises(ValueError, match=r"dist.device='tpu' is invalid"):
        config.DistConfig(device="tpu")
    assert plan.compute_device(config.DistConfig(device="cpu")) == torch.device("cpu")
    assert not wire.nccl_capable("cpu")
    monkeypatch.setenv(wire.FAKE_NCCL_ENV, "1")
    assert wire.nccl_capable("cpu")
    if not torch.cuda.is_available():
        assert plan.compute_device(config.DistConfig()) == torch.device("cpu")  # "auto"
        with pytest.raises(ValueError, match=r"dist.device='cuda' is invalid on this host"):
            plan.compute_device(config.DistConfig(device="cuda"))


@pytest.mark.skipif(torch.distributed.is_nccl_available() and torch.cuda.is_available(), reason="host has NCCL")
def test_backend_nccl_fails_at_start_on_a_host_without_it(tmp_path, monkeypatch):
    monkeypatch.delenv(wire.FAKE_NCCL_ENV, raising=False)
    monkeypatch.setenv(wire.SECRET_ENV, SECRET)
    cfg = config.config_from_dict(base_config(tmp_path, dist={"backend": "nccl"}))
    with pytest.raises(ValueError, match="the server cannot use NCCL"):
        roles.Server(cfg)
    with pytest.raises(ValueError, match="the device cannot use NCCL"):
        roles.Device(cfg, 0)


def test_payloads_travel_on_the_payload_group(monkeypatch):
    """The NCCL path (headers on the TCP connection, payloads on a second group; here a gloo stand-in): the
    payload arrives on the payload group, and a receiver looking for it on the TCP connection never gets it."""
    import torch.distributed as dist

    monkeypatch.setenv(wire.FAKE_NCCL_ENV, "1")
    store, made = dist.HashStore(), {}

    def make(r):
        made[r] = wire.nccl_pair_group(store, 0, 1, r, 1.5, "cpu")

    ts = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    a, b = thread_pair(1.5)
    a.payload_pg, b.payload_pg = made[0], made[1]
    plain = thread_pair(1.5)[0]
    assert (a.transport, plain.transport) == ("nccl", "gloo")
    t = torch.randn(2, 3, 4).to(torch.bfloat16)
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(a.send, t, wire.K_HIDDEN, 2e5)  # paced: 48 bytes in chunks
        got, _ = b.recv(wire.K_HIDDEN, t.dtype, (2, 3, 4))
        assert fut.result(10) == 48 and torch.equal(got, t)
        b.payload_pg = None  # a receiver looking for the payload on the TCP connection never gets it
        fut = ex.submit(a.send, t, wire.K_HIDDEN)
        with pytest.raises(RuntimeError):
            b.recv(wire.K_HIDDEN, t.dtype, (2, 3, 4))
        try:  # the sender may or may not have finished
            fut.result(10)
        except RuntimeError:
            pass


def test_cli_env_and_train_distributed_parser(capsys):
    from splitlora.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in ("python", "torch", "transformers", "peft", "numpy", "cuda", "gpu backend"))
    with pytest.raises(SystemExit, match="no role"):
        main(["train-distributed", "--config", str(Path(__file__)), "--rank", "-1"])

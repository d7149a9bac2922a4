"""The server and device roles of split LoRA training across processes and hosts on ``torch.distributed``.

Rank 0 runs :class:`Server`, rank m + 1 runs :class:`Device` m; for the same configuration and seed the result
equals the in-process :class:`~splitlora.training.trainer.SplitTrainer` (with LoRA dropout 0). The run
configuration is in :mod:`splitlora.distributed.config`, the tensor messages in :mod:`splitlora.distributed.wire`,
the entry points in :mod:`splitlora.distributed.launch`.
Source: docs/distributed.md, "What happens", "GPUs: compute device and NCCL" and "Limits".
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from splitlora._validate import check_int_range
from splitlora.atomic import atomic_save_folder, atomic_write
from splitlora.distributed.config import RunConfig
from splitlora.distributed.plan import RunPlan, compute_device, device_profile
from splitlora.distributed.wire import (K_CTRL, K_GRAD, K_HELLO, K_HIDDEN, K_LABELS, K_LOSS, K_MASK, K_PROFILE, K_RATES,
                                        K_STATS, K_TRANSPORT, TRANSPORTS, Link, ProtocolError, _local_addr,
                                        choose_transport, cuda_sync, nccl_capable, nccl_pair_group, pair_group,
                                        recv_adapter, send_adapter)
from splitlora.errors import InvalidParameterError, SplitLoRAError
from splitlora.training.node import LoraNode, trainable_names
from splitlora.training.split import split_model, tensor_bytes
from splitlora.training.step import DeviceHalf, ServerHalf, SmashedData
from splitlora.training.trainer import StepLog

CHECKPOINT_VERSION = 1
TURN, STOP = 1, 2


class JoinRefused(SplitLoRAError, ValueError):
    """The server refused this device: another configuration (fingerprint) or device index, or ``dist.backend:
    nccl`` where one end cannot use NCCL. Not retried: the device process exits with the reason."""


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _test_kill(step: int) -> None:
    """Test hook: ``SPLITLORA_TEST_KILL_AT=<global step>`` SIGKILLs this process at that step (mid-turn)."""
    at = os.environ.get("SPLITLORA_TEST_KILL_AT")
    if at is not None and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)



def _join_key(m: int) -> str:
    return f"splitlora/join/{m}"



# ============================================================================================ roles
@dataclass
class DistStepLog(StepLog):
    """:class:`StepLog` plus the link: rates (bit/s; the emulated rate, or the model's), measured up-link time of
    the smashed data (server clock) and down-link time of its gradient (device clock), the model's 8 S / R (s),
    and ``card_rate_bps``, the up-link rate CARD decided this turn's cut with (bit/s; ``link.rate_source``)."""
    channel_state: str = ""
    rate_up_bps: float = 0.0
    rate_down_bps: float = 0.0
    t_up_s: float = 0.0
    t_down_s: float = 0.0
    pred_up_s: float = 0.0
    pred_down_s: float = 0.0
    model_smashed_bytes: int = 0
    attempt: int = 0
    card_rate_bps: float = 0.0


class _Conn:
    def __init__(self, gen, pg, link, hello, profile):
        self.gen, self.pg, self.link, self.hello, self.profile = gen, pg, link, hello, profile


class Server:
    """Rank 0: owns the adapter between turns, runs CARD, drives the turns, checkpoints."""
    def __init__(self, cfg: RunConfig, plan: RunPlan | None = None):
        from peft import get_peft_model

        self.cfg, self.d = cfg, cfg.dist
        self.plan = plan = plan or RunPlan.build(cfg)
        torch.manual_seed(cfg.train.seed)  # as SplitTrainer: same LoRA initialisation
        model = get_peft_model(plan.base_model, plan.lora)  # this process's own base model: no copy needed
        model.train()
        self.dev = compute_device(self.d)
        self.nccl = nccl_capable(self.dev)
        if self.d.backend == "nccl":
            choose_transport("nccl", self.nccl, True)  # raises here, at start, if the server cannot
        self.node = LoraNode(model.to(self.dev), cfg.train)
        self.node.set_owned(list(self.node.params))
        self.L, self.H, self.wire = plan.num_units, plan.hidden_size, plan.wire_dtype
        self.turns = [(n, m) for n in range(cfg.rounds) for m in range(cfg.num_devices)]
        self.turn, self.global_step = 0, 0
        self.logs: list[DistStepLog] = []
        self.events: list[dict] = []
        self.conns: dict[int, _Conn] = {}
        self.absent: set[int] = set()
        self.refused: list[Link] = []
        self.rate_est: dict[int, float] = {}  # measured up-link rate of each device's last turn (bit/s)
        self.seen: set[int] = set()
        self.tried: dict[int, int] = {}
        self.ckpt = Path(self.d.checkpoint_dir) / "server.pt" if self.d.checkpoint_dir else None
        if self.ckpt is not None and self.d.resume and self.ckpt.exists():
            self.load(self.ckpt)

    # ---------------------------------------------------------------- state
    def event(self, kind: str, **kw) -> None:
        e = {"event": kind, "turn": self.turn, "global_step": self.global_step, "time": time.time(), **kw}
        self.events.append(e)
        print(f"[splitlora server] {e}", file=sys.stderr, flush=True)

    def state_dict(self) -> dict:
        n = self.node
        return {"version": CHECKPOINT_VERSION, "fingerprint": self.cfg.fingerprint(), "turn": self.turn,
                "global_step": self.global_step, "params": {k: n.params[k].detach().clone() for k in n.owned},
                "opt": n.opt_state(), "logs": [asdict(x) for x in self.logs], "events": self.events,
                "rng": torch.get_rng_state(), "rate_est": dict(self.rate_est)}

    def load(self, path: Path) -> None:
        st = torch.load(path, weights_only=True, map_location="cpu")
        if st.get("version") != CHECKPOINT_VERSION or st.get("fingerprint") != self.cfg.fingerprint():
            raise InvalidParameterError(f"checkpoint {path} is invalid: made with another version or configuration")
        self.node.wipe()
        self.node.set_owned(list(st["params"]), {"params": st["params"], "opt": st["opt"]})
        self.turn, self.global_step = int(st["turn"]), int(st["global_step"])
        self.logs = [DistStepLog(**x) for x in st["logs"]]
        self.events = list(st["events"])
        self.rate_est = {int(k): float(v) for k, v in st.get("rate_est", {}).items()}
        torch.set_rng_state(st["rng"])
        self.event("resumed", path=str(path))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole LoRA adapter, name -> CPU tensor (between turns the server owns all of it)."""
        return {k: self.node.params[k].detach().cpu().clone() for k in self.node.owned}

    # ---------------------------------------------------------------- connections
    def _connect(self, m: int, wait_s: float) -> _Conn | None:
        """The live connection to device m, making a new one if it (re)joined; None if it is not there."""
        deadline = time.monotonic() + wait_s
        while True:
            gen = self.store.add(_join_key(m), 0)
            old = self.conns.get(m)
            if gen > self.tried.get(m, 0):
                break
            if old is not None and old.gen == gen:
                return old
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        self._drop(m)
        self.tried[m] = gen  # a generation is tried once: its device may have moved on
        try:
            pg = pair_group(self.store, m, gen, 0, self.d.addr, self.d.timeout_s)
            link = Link(pg, 1, self.d.timeout_s)
            hello, _ = link.recv(K_HELLO, torch.int64, (5,))
            profile, _ = link.recv(K_PROFILE, torch.float64, (2,))
            idx, fp, last_step, _, device_nccl = hello.tolist()
            reason = None
            if idx != m or fp != self.cfg.fingerprint():
                reason = (f"device index {idx} / configuration fingerprint {fp} do not match the server's "
                          f"{m} / {self.cfg.fingerprint()}")
            else:
                try:
                    transport = choose_transport(self.d.backend, self.nccl, bool(device_nccl))
                except ValueError as err:
                    reason = str(err)
            if reason is not None:
                link.send(torch.tensor([-1], dtype=torch.int64), K_TRANSPORT)
                self.refused.append(link)  # closed at the end: closing now could cut the answer off
                self.event("join_refused", device=m, reason=reason)
                return None
            link.send(torch.tensor([TRANSPORTS.index(transport)], dtype=torch.int64), K_TRANSPORT)
            if transport == "nccl":
                link = Link(pg, 1, self.d.timeout_s, payload_device=self.dev,
                            payload_pg=nccl_pair_group(self.store, m, gen, 0, self.d.timeout_s, self.dev))
        except RuntimeError as err:
            self.event("join_failed", device=m, gen=gen, error=str(err)[:300])
            return None
        self.conns[m] = _Conn(gen, pg, link, hello, tuple(profile.tolist()))
        self.absent.discard(m)
        self.event("joined", device=m, gen=gen, device_last_step=last_step, transport=link.transport)
        return self.conns[m]

    def _drop(self, m: int) -> None:
        c = self.conns.pop(m, None)
        if c is not None:
            c.link.close()

    # ---------------------------------------------------------------- turns
    def _turn(self, c: _Conn, n: int, m: int, attempt: int) -> None:
        cfg, node, link = self.cfg, self.node, c.link
        t_turn = time.perf_counter()
        state = str(self.plan.channel_states[n, m])
        card_rate = float(self.plan.rates_bps[n, m])
        if cfg.link.rate_source == "measured":
            card_rate = self.rate_est.get(m, card_rate)
        cut = self.plan.decide_cut(n, m, c.profile[0], c.profile[1], card_rate)
        check_int_range("cut_layer", cut, 0, self.L)
        rate = float(self.plan.rates_bps[n, m]) * cfg.link.rate_scale
        pace = rate if cfg.link.emulate else 0.0
        d_part, s_part = split_model(node.model, cut, cfg.train.granularity)
        d_own, s_own = trainable_names(node, d_part), trainable_names(node, s_part)
        I = cfg.steps_per_round
        link.send(torch.tensor([TURN, n, self.global_step, cut, I], dtype=torch.int64), K_CTRL)
        link.send(torch.tensor([pace, pace], dtype=torch.float64), K_RATES)
        moved = send_adapter(link, node.export(d_own), pace)
        node.set_owned(s_own)
        logs = []
        for i in range(I):
            step = self.global_step + i
            log = DistStepLog(step, n, m, cut, 0.0, 0, 0, 0, moved if i == 0 else 0, channel_state=state,
                              rate_up_bps=rate, rate_down_bps=rate, attempt=attempt, card_rate_bps=card_rate,
                              model_smashed_bytes=int(self.plan.profile.smashed_bytes[cut]))
            if cut == self.L:
                loss, _ = link.recv(K_LOSS, torch.float32, (1,))
                log.loss = float(loss[0])
            else:
                def check(shp):
                    if len(shp) != 3 or shp[2] != self.H or not (1 <= shp[0] <= cfg.batch_size
                                                                 and 1 <= shp[1] <= cfg.seq_len):
                        raise ProtocolError(f"smashed data of shape {shp}: expected (<= {cfg.batch_size}, "
                                            f"<= {cfg.seq_len}, {self.H})")
                hid, log.t_up_s = link.recv(K_HIDDEN, self.wire, check=check)
                _test_kill(step)
                labels, _ = link.recv(K_LABELS, torch.int64, hid.shape[:2])
                am = link.recv(K_MASK, None, hid.shape[:2])[0] if cfg.train.send_attention_mask else None
                msg = SmashedData(hid, labels, am)
                t1 = time.perf_counter()
                half = ServerHalf(s_part, self.wire, cfg.train.compute_dtype)
                log.loss = float(half.forward(msg, bool(d_own)).detach())  # as in-process: no input grad at c = 0
                grad = half.backward(node.opt)
                cuda_sync(self.dev)
                log.server_time_s = time.perf_counter() - t1
                log.smashed_bytes, log.bytes_up = msg.smashed_bytes, msg.nbytes
                log.pred_up_s = 8.0 * log.smashed_bytes / rate
                if grad is not None:
                    link.send(grad, K_GRAD, pace)
                    log.bytes_down = tensor_bytes(grad)
                    log.pred_down_s = 8.0 * log.bytes_down / rate
            logs.append(log)
        stats, _ = link.recv(K_STATS, torch.float64, (I, 2))
        incoming, back = recv_adapter(link, {k: node.params[k] for k in d_own})
        node.set_owned(list(node.params), incoming)
        for log, (t_down, t_dev) in zip(logs, stats.tolist()):
            log.t_down_s, log.device_time_s = t_down, t_dev
        logs[-1].handover_bytes += back
        self.logs += logs
        self.global_step += I
        timed = [(x.smashed_bytes, x.t_up_s) for x in logs if x.smashed_bytes > 0 and x.t_up_s > 0]
        if timed:  # the device's up-link rate as CARD should see it (emulation's rate_scale undone)
            self.rate_est[m] = 8.0 * sum(b for b, _ in timed) / sum(t for _, t in timed) / cfg.link.rate_scale
        self.event("turn_done", round=n, device=m, cut=cut, steps=I, seconds=time.perf_counter() - t_turn)

    def _run_turn(self, n: int, m: int) -> bool:
        for attempt in range(1 + self.d.retries):
            wait = (self.d.join_timeout_s if attempt else
                    0.0 if m in self.seen else self.d.startup_timeout_s)
            self.seen.add(m)
            if attempt == 0 and m in self.absent:
                wait = 0.0
            c = self._connect(m, wait)
            if c is None:
                break
            owned, snap = list(self.node.owned), self.node.export(self.node.owned)
            rng = torch.get_rng_state()
            try:
                self._turn(c, n, m, attempt)
                return True
            except RuntimeError as err:  # gloo errors and ProtocolError
                self.node.wipe()
                self.node.set_owned(owned, snap)
                torch.set_rng_state(rng)
                self._drop(m)
                self.event("turn_failed", round=n, device=m, attempt=attempt, error=str(err)[:300])
        self.absent.add(m)
        self.event("skipped", round=n, device=m)
        return False

    def serve(self) -> dict:
        """Run every remaining turn, tell the devices to stop, write the outputs. Returns a summary."""
        fam = socket.AF_INET6 if ":" in self.d.addr else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.d.addr, self.d.port))
        sock.listen(128)
        self.store = dist.TCPStore(self.d.addr, self.d.port, None, True, datetime.timedelta(seconds=self.d.timeout_s),
                                   wait_for_workers=False, master_listen_fd=sock.detach())
        self.event("listening", addr=self.d.addr, port=self.d.port)
        if not self.d.output_dir:
            print("[splitlora server] dist.output_dir is not set: the trained adapter and the logs will not be "
                  "written (set it in the configuration or pass --output-dir)", file=sys.stderr, flush=True)
        while self.turn < len(self.turns):
            n, m = self.turns[self.turn]
            self._run_turn(n, m)
            self.turn += 1
            if self.ckpt is not None:
                _atomic_save(self.state_dict(), self.ckpt)
        for m in range(self.cfg.num_devices):
            c = self._connect(m, 0.0)
            if c is not None:
                try:
                    c.link.send(torch.tensor([STOP, 0, 0, 0, 0], dtype=torch.int64), K_CTRL)
                except RuntimeError:
                    pass
        self.write_outputs()
        time.sleep(0.5)  # let the devices read STOP before the store goes away
        for link in self.refused:
            link.close()
        return {"steps": self.global_step, "skipped": [e for e in self.events if e["event"] == "skipped"]}

    def write_outputs(self) -> None:
        """Write ``adapter.pt``, ``logs.json``, ``events.json`` and the PEFT ``adapter/`` folder to
        ``dist.output_dir`` (nothing if unset), each file renamed into place (:mod:`splitlora.atomic`)."""
        if not self.d.output_dir:
            return
        out = Path(self.d.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.adapter_state(), out / "adapter.pt")
        logs = json.dumps([asdict(x) for x in self.logs], indent=1)
        atomic_write(out / "logs.json", lambda tmp: tmp.write_text(logs))
        events = json.dumps(self.events, indent=1, default=str)
        atomic_write(out / "events.json", lambda tmp: tmp.write_text(events))
        atomic_save_folder(out / "adapter", lambda tmp: self.node.model.save_pretrained(str(tmp)))


class Device:
    """Rank m + 1: device m. Holds its data; receives its adapter part each turn and hands it back."""
    def __init__(self, cfg: RunConfig, m: int, plan: RunPlan | None = None):
        from peft import get_peft_model

        check_int_range("device index", m, 0, cfg.num_devices - 1)
        self.cfg, self.d, self.m = cfg, cfg.dist, m
        plan = plan or RunPlan.build(cfg)
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(plan.base_model, plan.lora)  # this process's own base model: no copy needed
        model.train()
        self.dev = compute_device(self.d)
        self.nccl = nccl_capable(self.dev)
        if self.d.backend == "nccl":
            choose_transport("nccl", True, self.nccl)  # raises here, at start, if this device cannot
        self.node = LoraNode(model.to(self.dev), cfg.train)
        self.node.wipe()
        self.wire = plan.wire_dtype
        self.data = plan.device_batches()[m]
        self.profile = device_profile(cfg, m)
        self.last_step, self.turns_done = -1, 0
        self.ckpt = Path(self.d.checkpoint_dir) / f"device{m}.pt" if self.d.checkpoint_dir else None
        if self.ckpt is not None and self.d.resume and self.ckpt.exists():
            st = torch.load(self.ckpt, weights_only=True, map_location="cpu")
            if st.get("version") != CHECKPOINT_VERSION or st.get("fingerprint") != cfg.fingerprint() or st["device"] != m:
                raise InvalidParameterError(f"checkpoint {self.ckpt} is invalid: another version, configuration or device")
            self.last_step, self.turns_done = int(st["last_step"]), int(st["turns_done"])
            torch.set_rng_state(st["rng"])

    def _turn(self, link: Link, ctrl: list[int], rates: list[float]) -> None:
        _, n, step0, cut, I = ctrl
        pace_up, pace_down = rates
        node, cfg = self.node, self.cfg
        d_part, _ = split_model(node.model, cut, cfg.train.granularity)
        d_own = trainable_names(node, d_part)
        incoming, _ = recv_adapter(link, {k: node.params[k] for k in d_own})
        node.wipe()
        node.set_owned(d_own, incoming)
        stats = []
        for i in range(I):
            b = {k: v.to(self.dev) for k, v in self.data[(n * I + i) % len(self.data)].items()}
            am = b["attention_mask"] if cfg.train.send_attention_mask else None
            t0, t_down, t_wait = time.perf_counter(), 0.0, 0.0
            half = DeviceHalf(d_part, self.wire, cfg.train.compute_dtype)
            msg = half.forward(b["input_ids"], b["labels"], am)
            g = None
            if msg is None:
                link.send(half.loss.detach().float().reshape(1), K_LOSS)
            else:
                tw = time.perf_counter()
                link.send(msg.hidden, K_HIDDEN, pace_up)
                link.send(msg.labels, K_LABELS, pace_up)
                if am is not None:
                    link.send(am, K_MASK, pace_up)
                _test_kill(step0 + i)
                if half.needs_gradient:
                    g, t_down = link.recv(K_GRAD, self.wire, msg.hidden.shape)
                t_wait = time.perf_counter() - tw
            half.backward(g, node.opt)
            cuda_sync(self.dev)
            stats.append([t_down, time.perf_counter() - t0 - t_wait])
        link.send(torch.tensor(stats, dtype=torch.float64), K_STATS)
        payload = node.export(d_own)
        send_adapter(link, payload, pace_up)
        payload = {"params": {k: v.cpu() for k, v in payload["params"].items()},
                   "opt": {k: {f: v.cpu() for f, v in st.items()} for k, st in payload["opt"].items()}}
        node.wipe()
        self.last_step, self.turns_done = step0 + I - 1, self.turns_done + 1
        if self.ckpt is not None:
            _atomic_save({"version": CHECKPOINT_VERSION, "fingerprint": self.cfg.fingerprint(), "device": self.m,
                          "last_step": self.last_step, "turns_done": self.turns_done, "last_adapter": payload,
                          "rng": torch.get_rng_state()}, self.ckpt)

    def serve(self) -> int:
        """Join, train the turns the server sends, rejoin after any error. Returns 0 on STOP, 1 if the server
        stays unreachable for ``join_timeout_s`` + ``startup_timeout_s``."""
        host = _local_addr(self.d.addr)
        last_ok = time.monotonic()
        while time.monotonic() - last_ok < self.d.join_timeout_s + self.d.startup_timeout_s:
            pg = link = None
            try:
                store = dist.TCPStore(self.d.addr, self.d.port, None, False,
                                      datetime.timedelta(seconds=self.d.startup_timeout_s), wait_for_workers=False)
                gen = store.add(_join_key(self.m), 1)
                pg = pair_group(store, self.m, gen, 1, host, self.d.idle_timeout_s)
                link = Link(pg, 0, self.d.timeout_s)
                link.send(torch.tensor([self.m, self.cfg.fingerprint(), self.last_step, gen, int(self.nccl)],
                                       dtype=torch.int64), K_HELLO)
                link.send(torch.tensor(self.profile, dtype=torch.float64), K_PROFILE)
                code = int(link.recv(K_TRANSPORT, torch.int64, (1,))[0][0])
                if code not in (0, 1):
                    raise JoinRefused(f"device {self.m}: the server at {self.d.addr}:{self.d.port} refused this "
                                      "device (see its join_refused event): another configuration file or device "
                                      f"index, or dist.backend={self.d.backend!r} where an end cannot use NCCL")
                if TRANSPORTS[code] == "nccl":
                    link = Link(pg, 0, self.d.timeout_s, payload_device=self.dev,
                                payload_pg=nccl_pair_group(store, self.m, gen, 1, self.d.timeout_s, self.dev))
                while True:
                    ctrl, _ = link.recv(K_CTRL, torch.int64, (5,), timeout_s=self.d.idle_timeout_s)
                    last_ok = time.monotonic()
                    ctrl = ctrl.tolist()
                    if ctrl[0] == STOP:
                        return 0
                    rates, _ = link.recv(K_RATES, torch.float64, (2,))
                    self._turn(link, ctrl, rates.tolist())
                    last_ok = time.monotonic()
            except RuntimeError as err:  # server gone, pair closed, timeout, protocol error: rejoin
                print(f"[splitlora device {self.m}] {str(err)[:200]}; rejoining", file=sys.stderr, flush=True)
                self.node.wipe()
                if link is not None:
                    link.close()
                elif pg is not None:
                    try:
                        pg.abort()
                    except Exception:  # noqa: BLE001
                        pass
                time.sleep(0.2)
        return 1

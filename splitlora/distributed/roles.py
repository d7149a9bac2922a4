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
import math
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from splitlora._validate import check_int_range
from splitlora.atomic import atomic_save_folder, atomic_write, load_checkpoint_file
from splitlora.distributed.config import RunConfig
from splitlora.distributed.plan import RunPlan, check_writable, compute_device, device_profile, run_folders
from splitlora.distributed.wire import (DUPLICATE, K_CTRL, K_GRAD, K_HIDDEN, K_LABELS, K_LOSS, K_MASK, K_RATES,
                                        K_STATS, REFUSED, TRANSPORTS, UNAUTHENTICATED, Link, ProtocolError,
                                        choose_transport, cuda_sync, device_handshake, load_secret, local_addr,
                                        nccl_capable, nccl_pair_group, recv_adapter, send_adapter, server_answer,
                                        server_handshake)
from splitlora.errors import CorruptFileError, InvalidParameterError, SplitLoRAError
from splitlora.training.node import LoraNode, trainable_names
from splitlora.training.split import split_model, tensor_bytes
from splitlora.training.step import DeviceHalf, ServerHalf, SmashedData
from splitlora.training.trainer import StepLog

CHECKPOINT_VERSION = 2  # 2: server logs and events in JSONL files beside server.pt
TURN, STOP = 1, 2


class JoinRefused(SplitLoRAError, ValueError):
    """The server refused this device: another shared secret, configuration (fingerprint) or device index, or
    ``dist.backend: nccl`` where one end cannot use NCCL. Not retried: the device process exits with the reason."""


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _test_kill(step: int) -> None:
    """Test hook: ``SPLITLORA_TEST_KILL_AT=<global step>`` SIGKILLs this process at that step (mid-turn; the
    parallel modes' server: before it applies that step)."""
    at = os.environ.get("SPLITLORA_TEST_KILL_AT")
    if at is not None and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)



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
    def __init__(self, gen, link, hello, profile):
        self.gen, self.link, self.hello, self.profile = gen, link, hello, profile


class RunIncomplete(SplitLoRAError, RuntimeError):
    """The run trained fewer mini-batches than configured (skipped turns): nothing replaces the outputs of an
    earlier run; the exit code is non-zero and the message says why and where what was trained is."""


def _load_checkpoint(path: Path) -> dict:
    """A role's checkpoint (:func:`splitlora.atomic.load_checkpoint_file`, ``torch.load(weights_only=True)``); an
    unreadable one raises InvalidParameterError with its path and what to do."""
    try:
        return load_checkpoint_file(path, map_location="cpu")
    except CorruptFileError as err:
        raise InvalidParameterError(
            f"checkpoint {str(path)!r} is invalid: it cannot be read ({err.__cause__!r:.200}), e.g. truncated; must be a "
            "complete splitlora checkpoint: delete it to start over, or set dist.resume: false") from None


def _append_jsonl(path: Path, rows: list) -> None:
    """Append one JSON line per row and flush it to disk (the server's logs and events: a turn appends)."""
    if rows:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())


def _read_jsonl(path: Path, n: int, ckpt: Path) -> list:
    """The first ``n`` lines of ``path`` (lines after them were appended after the last checkpoint)."""
    try:
        lines = path.read_text().splitlines()[:n]
        rows = [json.loads(x) for x in lines]
    except (OSError, ValueError) as err:
        raise InvalidParameterError(f"checkpoint {str(ckpt)!r} is invalid: {path.name} cannot be read ({err}); "
                                    "delete the folder to start over, or set dist.resume: false") from None
    if len(rows) != n:
        raise InvalidParameterError(f"checkpoint {str(ckpt)!r} is invalid: {path.name} holds {len(rows)} of its "
                                    f"{n} rows; delete the folder to start over, or set dist.resume: false")
    return rows


LOGS_FILE, EVENTS_FILE = "server.logs.jsonl", "server.events.jsonl"


class Server:
    """Rank 0: owns the adapter between turns, runs CARD, drives the turns, checkpoints, writes the outputs.

    Raises InvalidParameterError at construction (before any step) for no shared secret
    (:func:`~splitlora.distributed.wire.load_secret`), an output or checkpoint folder it cannot write, an
    unreadable checkpoint."""
    def __init__(self, cfg: RunConfig, plan: RunPlan | None = None):
        from peft import get_peft_model

        self.cfg, self.d = cfg, cfg.dist
        self.secret = load_secret(self.d.secret_file)
        self.out, ckpt_dir = run_folders(cfg)
        check_writable(self.out, "dist.output_dir")
        if ckpt_dir is not None:
            check_writable(ckpt_dir, "dist.checkpoint_dir")
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
        self.vocab = int(plan.base_model.config.vocab_size)
        self.turns = [(n, m) for n in range(cfg.rounds) for m in range(cfg.num_devices)]
        self.total_steps = len(self.turns) * cfg.steps_per_round
        self.turn, self.global_step = 0, 0
        self.logs: list[DistStepLog] = []
        self.events: list[dict] = []
        self.conns: dict[int, _Conn] = {}
        self.joins: dict[int, int] = {}  # connections accepted per device (the ``gen`` of a join)
        self.absent: set[int] = set()
        self.rate_est: dict[int, float] = {}  # measured up-link rate of each device's last turn (bit/s)
        self.seen: set[int] = set()
        self.listener = self._nccl_store = None
        self._saved: tuple[int, int] | None = None  # logs, events in the checkpoint's JSONL files (None: rewrite)
        self.ckpt = ckpt_dir / "server.pt" if ckpt_dir is not None else None
        if self.ckpt is not None and self.d.resume and self.ckpt.exists():
            self.load(self.ckpt)

    # ---------------------------------------------------------------- state
    def event(self, kind: str, **kw) -> None:
        e = {"event": kind, "turn": self.turn, "global_step": self.global_step, "time": time.time(), **kw}
        self.events.append(e)
        print(f"[splitlora server] {e}", file=sys.stderr, flush=True)

    def state_dict(self) -> dict:
        """The checkpoint ``server.pt``: adapter, optimiser, RNG, position, and how many rows of the logs and
        events files belong to it (they are appended to ``server.logs.jsonl`` / ``server.events.jsonl``, so a
        turn writes a constant amount, not the whole history)."""
        n = self.node
        return {"version": CHECKPOINT_VERSION, "fingerprint": self.cfg.fingerprint(), "turn": self.turn,
                "global_step": self.global_step, "params": {k: n.params[k].detach().clone() for k in n.owned},
                "opt": n.opt_state(), "n_logs": len(self.logs), "n_events": len(self.events),
                "rng": torch.get_rng_state(), "rate_est": dict(self.rate_est)}

    def checkpoint(self) -> None:
        """Append the logs and events since the last checkpoint (the first time: write both files whole), then
        replace ``server.pt`` (:mod:`splitlora.atomic`)."""
        folder = self.ckpt.parent
        logs, events = [asdict(x) for x in self.logs], self.events
        if self._saved is None:
            for name, rows in ((LOGS_FILE, logs), (EVENTS_FILE, events)):
                text = "".join(json.dumps(r, default=str) + "\n" for r in rows)
                atomic_write(folder / name, lambda tmp, text=text: tmp.write_text(text))
        else:
            _append_jsonl(folder / LOGS_FILE, logs[self._saved[0]:])
            _append_jsonl(folder / EVENTS_FILE, events[self._saved[1]:])
        self._saved = (len(logs), len(events))
        _atomic_save(self.state_dict(), self.ckpt)

    def load(self, path: Path) -> None:
        st = _load_checkpoint(path)
        if st.get("version") != CHECKPOINT_VERSION or st.get("fingerprint") != self.cfg.fingerprint():
            raise InvalidParameterError(f"checkpoint {str(path)!r} is invalid: made with another version or "
                                        "configuration; delete it to start over, or set dist.resume: false")
        self.node.wipe()
        self.node.set_owned(list(st["params"]), {"params": st["params"], "opt": st["opt"]})
        self.turn, self.global_step = int(st["turn"]), int(st["global_step"])
        if self.turn >= self._units() and self.global_step < self.total_steps:
            raise InvalidParameterError(
                f"checkpoint {str(path)!r} is invalid to resume: it holds an incomplete run that ended after every turn "
                f"({self.global_step} of {self.total_steps} mini-batches trained), so resuming would only end it again; "
                f"delete {str(path.parent)!r} to run again from the start, or set dist.resume: false")
        self.logs = [DistStepLog(**x) for x in _read_jsonl(path.parent / LOGS_FILE, int(st["n_logs"]), path)]
        self.events = _read_jsonl(path.parent / EVENTS_FILE, int(st["n_events"]), path)
        self.rate_est = {int(k): float(v) for k, v in st.get("rate_est", {}).items()}
        torch.set_rng_state(st["rng"])
        self._saved = None  # rows appended after that checkpoint are dropped at the next one
        self.event("resumed", path=str(path))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole LoRA adapter, name -> CPU tensor (between turns the server owns all of it)."""
        return {k: self.node.params[k].detach().cpu().clone() for k in self.node.owned}

    # ---------------------------------------------------------------- connections
    def _listen(self) -> None:
        fam = socket.AF_INET6 if ":" in self.d.addr else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.d.addr, self.d.port))
        sock.listen(128)
        sock.setblocking(False)
        self.listener = sock

    def _store(self):
        """The TCPStore of the NCCL rendezvous (made at the first NCCL pair, on ``addr`` and a free port)."""
        if self._nccl_store is None:
            fam = socket.AF_INET6 if ":" in self.d.addr else socket.AF_INET
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.bind((self.d.addr, 0))
            sock.listen(128)
            port = sock.getsockname()[1]
            self._nccl_store = dist.TCPStore(self.d.addr, port, None, True,
                                             datetime.timedelta(seconds=self.d.timeout_s), wait_for_workers=False,
                                             master_listen_fd=sock.detach())
            self._nccl_store_port = port
        return self._nccl_store

    def _accept_pending(self) -> None:
        """Accept and authenticate every connection waiting on the listener."""
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. out of file descriptors: try again at the next wait
                self.event("join_failed", peer=None, error=f"accept: {err}")
                return
            sock.setblocking(True)
            self._handshake(sock, f"{peer[0]}:{peer[1]}")

    def _handshake(self, sock: socket.socket, who: str) -> None:
        """Authenticate a new connection and register it as device m's, or refuse it with an event: a wrong
        proof of the secret, an unknown device index, another configuration, a device m that is still connected
        (a duplicate identity), NCCL that an end cannot honour. Never raises for what the peer sends."""
        link = Link(sock, self.d.timeout_s)
        try:
            hello, profile, dnonce, nonce, ok = server_handshake(link, self.secret, self.d.timeout_s)
            m, fp, last_step, device_nccl = hello
            code, reason, transport = REFUSED, None, None
            old = self.conns.get(m)
            if not ok:
                code, reason = UNAUTHENTICATED, "authentication failed: the peer did not prove the shared secret"
            elif not 0 <= m < self.cfg.num_devices:
                reason = f"unknown device index {m}: this run has devices 0..{self.cfg.num_devices - 1}"
            elif fp != self.cfg.fingerprint():
                reason = f"configuration fingerprint {fp} does not match the server's {self.cfg.fingerprint()}"
            elif old is not None and old.link.alive():
                code, reason = DUPLICATE, (f"device {m} is already connected (join {old.gen}): a second process "
                                           "claims its identity")
            elif not (profile[0] > 0 and profile[1] > 0 and all(map(math.isfinite, profile))):
                reason = f"device profile {profile} is invalid: must be finite FLOP/s and memory bytes > 0"
            else:
                try:
                    transport = choose_transport(self.d.backend, self.nccl, bool(device_nccl))
                except ValueError as err:
                    reason = str(err)
            if reason is not None:
                server_answer(link, self.secret, dnonce, nonce, code)
                link.close()
                self.event("join_refused", device=m, peer=who, reason=reason)
                return
            self._drop(m)
            gen = self.joins[m] = self.joins.get(m, 0) + 1
            token = secrets.randbits(62)
            port = 0
            if transport == "nccl":
                self._store()
                port = self._nccl_store_port
            server_answer(link, self.secret, dnonce, nonce, TRANSPORTS.index(transport), port, token)
            if transport == "nccl":
                link.payload_pg = nccl_pair_group(self._store(), m, token, 0, self.d.timeout_s, self.dev, self.d.addr)
                link.payload_device = self.dev
        except Exception as err:  # noqa: BLE001  ProtocolError, LinkClosed, a failed NCCL rendezvous: never fatal
            link.close()
            self.event("join_failed", peer=who, error=f"{type(err).__name__}: {str(err)[:300]}")
            return
        self.conns[m] = _Conn(gen, link, hello, profile)
        self.absent.discard(m)
        self.event("joined", device=m, gen=gen, device_last_step=last_step, transport=link.transport, peer=who)

    def _connect(self, m: int, wait_s: float) -> _Conn | None:
        """The live connection to device m, accepting new ones while waiting up to ``wait_s``; None if it is not
        there."""
        deadline = time.monotonic() + wait_s
        while True:
            self._accept_pending()
            c = self.conns.get(m)
            if c is not None and c.link.alive():
                return c
            self._drop(m)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

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
                if not torch.isfinite(loss).all():
                    raise ProtocolError(f"loss {float(loss[0])} is not finite")
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
                self._check_smashed(hid, labels, am)
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
        if not all(torch.isfinite(t).all() for t in [*incoming["params"].values(),
                                                     *(v for st in incoming["opt"].values() for v in st.values())]):
            raise ProtocolError("the returned adapter holds values that are not finite")
        if link.pending():
            raise ProtocolError("bytes beyond the turn's last message: the device sent more than it announced")
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

    def _check_smashed(self, hid: torch.Tensor, labels: torch.Tensor, am) -> None:
        """Refuse smashed data that is not finite, labels outside [0, vocab) other than -100, a mask other than
        0/1, before any of it reaches the model."""
        if not torch.isfinite(hid).all():
            raise ProtocolError("smashed data holds values that are not finite")
        if ((labels != -100) & ((labels < 0) | (labels >= self.vocab))).any():
            raise ProtocolError(f"labels outside [0, {self.vocab}) other than -100")
        if am is not None and (am.dtype not in (torch.int64, torch.int32, torch.bool, torch.uint8) or
                               ((am != 0) & (am != 1)).any()):
            raise ProtocolError(f"attention mask of dtype {am.dtype} with values other than 0 and 1")

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
            except Exception as err:  # noqa: BLE001  ProtocolError, LinkClosed, and whatever a peer's data causes
                self.node.wipe()
                self.node.set_owned(owned, snap)
                torch.set_rng_state(rng)
                self._drop(m)  # the device notices at once and rejoins
                self.event("turn_failed", round=n, device=m, attempt=attempt,
                           error=f"{type(err).__name__}: {str(err)[:300]}")
        self.absent.add(m)
        self.event("skipped", round=n, device=m)
        return False

    def serve(self) -> dict:
        """Run every remaining unit of work (a turn here, a round in the parallel modes: :meth:`_units`,
        :meth:`_run_unit`), checkpointing after each, tell the devices to stop, write the outputs (:meth:`finish`).
        Returns a summary; raises RunIncomplete for a run that trained fewer mini-batches than configured."""
        self._check_mode()
        self._listen()
        self.event("listening", addr=self.d.addr, port=self.d.port, **({} if self.cfg.mode == "sequential"
                                                                       else {"mode": self.cfg.mode}))
        try:
            while self.turn < self._units():
                self._run_unit(self.turn)
                self.turn += 1
                if self.ckpt is not None:
                    self.checkpoint()
            self._stop_devices()
            return self.finish()
        finally:
            for m in list(self.conns):
                self._drop(m)
            self.listener.close()

    def _check_mode(self) -> None:
        if self.cfg.mode != "sequential":  # the parallel modes: splitlora.distributed.parallel_roles.ParallelServer
            raise InvalidParameterError(f"mode={self.cfg.mode!r} is invalid for Server: must be 'sequential' (use "
                                        "splitlora.distributed.parallel_roles.ParallelServer)")

    def _units(self) -> int:
        """How many units of work the run has: device turns (N x M)."""
        return len(self.turns)

    def _run_unit(self, k: int) -> None:
        self._run_turn(*self.turns[k])

    def _stop_devices(self) -> None:
        for m in range(self.cfg.num_devices):
            c = self._connect(m, 0.0)
            if c is not None:
                try:
                    c.link.send(torch.tensor([STOP, 0, 0, 0, 0], dtype=torch.int64), K_CTRL)
                except RuntimeError:
                    pass

    def finish(self) -> dict:
        """Write the outputs if every configured mini-batch was trained; else keep the outputs of any earlier
        run as they are, write what was trained (if anything) to ``<output folder>/incomplete`` and raise
        RunIncomplete with the reason."""
        skipped = [(e["round"], e["device"]) for e in self.events if e["event"] in ("skipped", "left_out")]
        summary = {"steps": self.global_step, "expected_steps": self.total_steps, "skipped": skipped}
        if self.global_step == self.total_steps:
            self.write_outputs(self.out)
            return summary
        reason = (f"the run trained {self.global_step} of its {self.total_steps} mini-batches (turns skipped, "
                  f"(round, device): {skipped}; see the join_refused / turn_failed events)")
        if self.global_step:
            self.event("incomplete", reason=reason, written_to=str(self.out / "incomplete"))
            self.write_outputs(self.out / "incomplete")
            where = f"what it trained is in {self.out / 'incomplete'}"
        else:
            self.event("incomplete", reason=reason, written_to=None)
            where = "nothing was written"
        if self.ckpt is not None:
            self.checkpoint()
        raise RunIncomplete(f"{reason}: {where}; the outputs in {self.out} were left as they were")

    def write_outputs(self, out: Path) -> None:
        """Write ``adapter.pt``, ``logs.json``, ``events.json`` and the PEFT ``adapter/`` folder to ``out``, each
        file renamed into place (:mod:`splitlora.atomic`)."""
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
        self.secret = load_secret(self.d.secret_file)
        _, ckpt_dir = run_folders(cfg)
        if ckpt_dir is not None:
            check_writable(ckpt_dir, "dist.checkpoint_dir")
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
        self.ckpt = ckpt_dir / f"device{m}.pt" if ckpt_dir is not None else None
        if self.ckpt is not None and self.d.resume and self.ckpt.exists():
            st = _load_checkpoint(self.ckpt)
            if st.get("version") != CHECKPOINT_VERSION or st.get("fingerprint") != cfg.fingerprint() or \
                    st.get("device") != m:
                raise InvalidParameterError(f"checkpoint {str(self.ckpt)!r} is invalid: another version, "
                                            "configuration or device; delete it, or set dist.resume: false")
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
        stays unreachable for ``join_timeout_s`` + ``startup_timeout_s``. Raises JoinRefused when the server
        refuses this device (secret, configuration, index, NCCL)."""
        last_ok = time.monotonic()
        where, last_msg = f"{self.d.addr}:{self.d.port}", None
        while time.monotonic() - last_ok < self.d.join_timeout_s + self.d.startup_timeout_s:
            link = None
            try:
                sock = socket.create_connection((self.d.addr, self.d.port), timeout=self.d.timeout_s)
                # the server answers a join between two turns: wait for it as for a first join
                link = Link(sock, self.d.startup_timeout_s, peer=0)
                code, store_port, token = device_handshake(
                    link, self.secret, [self.m, self.cfg.fingerprint(), self.last_step, int(self.nccl)], self.profile)
                link.timeout_s = self.d.timeout_s
                if code == UNAUTHENTICATED:
                    raise JoinRefused(f"device {self.m}: the server at {where} refused this device: authentication "
                                      "failed (another shared secret: SPLITLORA_SECRET / dist.secret_file)")
                if code == REFUSED:
                    raise JoinRefused(f"device {self.m}: the server at {where} refused this device (see its "
                                      "join_refused event): another configuration file or device index, or "
                                      f"dist.backend={self.d.backend!r} where an end cannot use NCCL")
                if code == DUPLICATE:
                    raise ProtocolError("the server holds a live connection for this device index (another process "
                                        "claims it, or the previous connection is not closed yet)")
                if code not in (0, 1):
                    raise ProtocolError(f"answer code {code}")
                if TRANSPORTS[code] == "nccl":
                    store = dist.TCPStore(self.d.addr, store_port, None, False,
                                          datetime.timedelta(seconds=self.d.startup_timeout_s), wait_for_workers=False)
                    link.payload_pg = nccl_pair_group(store, self.m, token, 1, self.d.timeout_s, self.dev,
                                                      local_addr(self.d.addr))
                    link.payload_device = self.dev
                while True:
                    ctrl, _ = link.recv(K_CTRL, torch.int64, (5,), timeout_s=self.d.idle_timeout_s)
                    last_ok = time.monotonic()
                    ctrl = ctrl.tolist()
                    if ctrl[0] == STOP:
                        link.close()
                        return 0
                    rates, _ = link.recv(K_RATES, torch.float64, (2,))
                    self._turn(link, ctrl, rates.tolist())
                    last_ok = time.monotonic()
            except JoinRefused:
                if link is not None:
                    link.close()
                raise
            except (RuntimeError, OSError) as err:  # server gone, connection closed, timeout, protocol error
                msg = f"{str(err)[:200]}; rejoining"
                if msg != last_msg:  # once per kind of failure, not every 0.2 s while the server is away
                    print(f"[splitlora device {self.m}] {msg}", file=sys.stderr, flush=True)
                    last_msg = msg
                self.node.wipe()
                if link is not None:
                    link.close()
                time.sleep(0.2)
        return 1

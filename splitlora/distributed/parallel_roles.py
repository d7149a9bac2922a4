"""The server of the parallel training modes across processes: ``splitfed`` (SFL-V2), ``splitfed_v1`` and ``fedlora``.

The devices are the sequential mode's :class:`~splitlora.distributed.roles.Device` (a round is one turn for each);
:class:`ParallelServer` opens every device's turn of a round at once, serves their smashed data in the order of
:func:`splitlora.training.federated.run_parallel` and averages the adapters with its FedAvg, so a run equals
``run_in_process`` (``SplitTrainer.run(mode=...)``). Source: docs/distributed.md, "Training modes".
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from splitlora._validate import check_int_range
from splitlora.distributed.roles import TURN, DistStepLog, Server, _test_kill
from splitlora.errors import InvalidParameterError
from splitlora.distributed.wire import (K_CTRL, K_GRAD, K_HIDDEN, K_LABELS, K_LOSS, K_MASK, K_RATES, K_STATS,
                                        ProtocolError, cuda_sync, recv_adapter, send_adapter)
from splitlora.training.federated import _merge, _subset, fedavg_payloads
from splitlora.training.node import trainable_names
from splitlora.training.split import split_model, tensor_bytes
from splitlora.training.step import ServerHalf, SmashedData

_RELEASE = object()  # tells a connection's thread to stop waiting for a gradient


class ParallelServer(Server):
    """Rank 0 of a ``splitfed``, ``splitfed_v1`` or ``fedlora`` run (``RunConfig.mode``).

    Round n: the cut of every device (:meth:`~splitlora.distributed.plan.RunPlan.round_cuts`: the parallel
    schedule's CARD, or c = L for fedlora); each connected device gets its turn (cut, the round's global
    device-side adapter with its AdamW state) at once and trains at the same time as the others, one thread per
    connection carrying its messages. The server applies the smashed data round-robin, the i-th mini-batch of
    devices 0..M-1 before any (i+1)-th, each with one update of the one server-side adapter (SFL-V2), or of
    device m's own copy of the round's global server-side adapter (SFL-V1, ``splitfed_v1``). At the
    round's end each device's model (its returned adapter + the server-side matrices of its cut) is averaged by
    :func:`~splitlora.training.federated.fedavg_payloads` (weights: the records each device holds), each matrix
    over the devices that hold it. A device lost mid-round (closed connection, timeout, a message refused) keeps
    the server updates already applied (SFL-V1: its copy is dropped), is left out of the average (``left_out``
    event) and the run is incomplete; one absent at the round's start is ``skipped``. Checkpoints at each round's end
    (``turn`` = rounds done)."""

    def __init__(self, cfg, plan=None):
        super().__init__(cfg, plan)
        self._lost_last: set[int] = set()  # devices lost in the previous round: given join_timeout_s to rejoin

    def _check_mode(self) -> None:
        if self.cfg.mode == "sequential":
            raise InvalidParameterError("mode='sequential' is invalid for ParallelServer: must be 'splitfed', "
                                        "'splitfed_v1' or 'fedlora' (use splitlora.distributed.roles.Server)")

    def _units(self) -> int:
        """How many units of work the run has: rounds (``turn`` counts rounds done)."""
        return self.cfg.rounds

    def _run_unit(self, k: int) -> None:
        self._round(k)

    # ---------------------------------------------------------------- one round
    def _participants(self, n: int) -> dict:
        """The connections of round n: a device not seen yet is awaited ``startup_timeout_s``, one lost in the
        previous round ``join_timeout_s`` (it rejoins by itself), an absent one not at all."""
        conns = {}
        for m in range(self.cfg.num_devices):
            wait = (self.d.startup_timeout_s if m not in self.seen else
                    self.d.join_timeout_s if m in self._lost_last else 0.0)
            self.seen.add(m)
            c = self._connect(m, wait)
            if c is None:
                self.absent.add(m)
                self.event("skipped", round=n, device=m)
            else:
                conns[m] = c
        return conns

    def _round(self, n: int) -> None:
        cfg, node, M, I = self.cfg, self.node, self.cfg.num_devices, self.cfg.steps_per_round
        t_round = time.perf_counter()
        conns = self._participants(n)
        profiles, card_rates = [], []
        for m in range(M):
            profiles.append(conns[m].profile if m in conns else self.plan_profile(m))
            r = float(self.plan.rates_bps[n, m])
            card_rates.append(self.rate_est.get(m, r) if cfg.link.rate_source == "measured" else r)
        cuts = self.plan.round_cuts(n, profiles, card_rates)
        if cfg.mode == "fedlora":  # federated LoRA ignores device memory: say which devices could not hold the model
            need = float(self.plan.cost_model.device_memory_bytes[-1])
            told = {e["device"] for e in self.events if e["event"] == "exceeds_memory"}  # once a run, resumed too
            for m in conns:
                if profiles[m][1] < need and m not in told:
                    self.event("exceeds_memory", device=m, needed_bytes=need, memory_bytes=float(profiles[m][1]))
        glob = node.export(node.owned)
        parts = {}
        for m, c in enumerate(cuts):
            check_int_range("cut_layer", c, 0, self.L)
            d_part, s_part = split_model(node.model, c, cfg.train.granularity)
            parts[m] = (d_part, s_part, trainable_names(node, d_part), trainable_names(node, s_part))
        step0 = self.global_step
        inq = {m: queue.Queue() for m in conns}
        outq = {m: queue.Queue() for m in conns}
        threads = []
        for m, c in conns.items():
            rate = float(self.plan.rates_bps[n, m]) * cfg.link.rate_scale
            ctrl = torch.tensor([TURN, n, step0 + m * I, cuts[m], I], dtype=torch.int64)
            t = threading.Thread(target=self._carry, name=f"splitlora-device{m}", daemon=True,
                                 args=(c.link, ctrl, rate if cfg.link.emulate else 0.0, _subset(glob, parts[m][2]),
                                       parts[m][2], cuts[m], I, inq[m], outq[m]))
            t.start()
            threads.append(t)
        copy_of = (lambda m: m) if cfg.mode == "splitfed_v1" else (lambda m: 0)  # SFL-V1: a copy per device
        server = {copy_of(m): _subset(glob, list(glob["params"])) for m in (conns or [0])}
        logs = {m: [] for m in conns}
        live = set(conns)
        for i in range(I):
            for m in sorted(live):
                item = self._next(n, m, inq, live, outq, logs)
                if item is None:
                    continue
                _test_kill(self.global_step)
                _, payload, t_up, moved = item
                rate = float(self.plan.rates_bps[n, m]) * cfg.link.rate_scale
                log = DistStepLog(self.global_step, n, m, cuts[m], 0.0, 0, 0, 0, moved if i == 0 else 0,
                                  channel_state=str(self.plan.channel_states[n, m]), rate_up_bps=rate,
                                  rate_down_bps=rate, card_rate_bps=card_rates[m],
                                  model_smashed_bytes=int(self.plan.profile.smashed_bytes[cuts[m]]))
                try:
                    if cuts[m] == self.L:
                        log.loss = float(payload[0])
                    else:
                        k = copy_of(m)
                        server[k], grad = self._server_step(log, payload, t_up, parts[m], server[k], rate)
                        outq[m].put(grad)
                except Exception as err:  # noqa: BLE001  what a device's data makes fail
                    self._leave_out(n, m, live, outq, err, len(logs[m]))
                    continue
                logs[m].append(log)
                self.logs.append(log)
                self.global_step += 1
        done = {}
        for m in sorted(live):
            item = self._next(n, m, inq, live, outq, logs)
            if item is None:
                continue
            _, stats, incoming, back = item
            for log, (t_down, t_dev) in zip(logs[m], stats.tolist()):
                log.t_down_s, log.device_time_s = t_down, t_dev
            logs[m][-1].handover_bytes += back
            done[m] = incoming
            timed = [(x.smashed_bytes, x.t_up_s) for x in logs[m] if x.smashed_bytes > 0 and x.t_up_s > 0]
            if timed:
                self.rate_est[m] = 8.0 * sum(b for b, _ in timed) / sum(t for _, t in timed) / cfg.link.rate_scale
            self.event("turn_done", round=n, device=m, cut=cuts[m], steps=I)
        for t in threads:
            t.join(timeout=1.0)
        self._lost_last = set(conns) - set(done)
        weights = self.plan_weights()
        models = [_merge(_subset(server[copy_of(m)], parts[m][3]), done[m]) for m in sorted(done)]  # lost: dropped
        base = server[0] if cfg.mode == "splitfed" else glob  # matrices no participant holds
        new = _merge(base, fedavg_payloads(models, [weights[m] for m in sorted(done)]))
        node.wipe()
        node.set_owned(list(glob["params"]), new)
        self.event("round_done", round=n, devices=sorted(done), cuts=cuts, seconds=time.perf_counter() - t_round)

    def _server_step(self, log, payload, t_up, part, shared, rate):
        """One server update on device m's smashed data: load the server-side matrices of its cut from ``shared``
        (the one SFL-V2 adapter, or device m's SFL-V1 copy), forward, loss, backward, AdamW step; returns (``shared``
        with them updated, the gradient to send or None)."""
        cfg, node = self.cfg, self.node
        _, s_part, d_own, s_own = part
        hid, labels, am = payload
        self._check_smashed(hid, labels, am)
        msg = SmashedData(hid, labels, am)
        node.wipe()  # as in-process: no optimiser state of the previous device carries over
        node.set_owned(s_own, _subset(shared, s_own))
        t1 = time.perf_counter()
        half = ServerHalf(s_part, self.wire, cfg.train.compute_dtype)
        log.loss = float(half.forward(msg, bool(d_own)).detach())
        grad = half.backward(node.opt)
        cuda_sync(self.dev)
        log.server_time_s = time.perf_counter() - t1
        log.smashed_bytes, log.bytes_up, log.t_up_s = msg.smashed_bytes, msg.nbytes, t_up
        log.pred_up_s = 8.0 * log.smashed_bytes / rate
        if grad is not None:
            log.bytes_down = tensor_bytes(grad)
            log.pred_down_s = 8.0 * log.bytes_down / rate
        return _merge(shared, node.export(s_own)), grad

    def _next(self, n: int, m: int, inq, live: set, outq, logs: dict):
        """Device m's next message from its connection's thread, or None when the thread reported an error (the
        device is then left out of round n: :meth:`_leave_out`)."""
        item = inq[m].get()
        if item[0] == "error":
            self._leave_out(n, m, live, outq, item[1], len(logs[m]))
            return None
        return item

    def _leave_out(self, n: int, m: int, live: set, outq: dict, err, steps: int) -> None:
        """Device m is lost in round n: release its thread, close its connection, log ``left_out``."""
        live.discard(m)
        outq[m].put(_RELEASE)
        self._drop(m)
        self.event("left_out", round=n, device=m, steps=steps,
                   error=f"{type(err).__name__}: {str(err)[:300]}")

    def plan_profile(self, m: int):
        from splitlora.distributed.plan import device_profile

        return device_profile(self.cfg, m)

    def plan_weights(self) -> list[float]:
        """FedAvg weights: the records each device holds (batches_per_device x batch_size; the same for all
        devices of a configuration, as ``run_parallel``'s default)."""
        return [float(self.cfg.batches_per_device * self.cfg.batch_size)] * self.cfg.num_devices

    # ---------------------------------------------------------------- one connection (its own thread)
    def _carry(self, link, ctrl, pace, payload, d_own, cut, I, inq, outq) -> None:
        """Carry device m's turn on its connection: send the turn and adapter, pass each mini-batch's smashed data
        (or loss at c = L) to the main thread and its gradient back, then receive the stats and the adapter.
        Everything goes to ``inq`` as ("step", payload, t_up, moved), ("done", stats, adapter, bytes) or
        ("error", exception)."""
        cfg = self.cfg
        try:
            link.send(ctrl, K_CTRL)
            link.send(torch.tensor([pace, pace], dtype=torch.float64), K_RATES)
            moved = send_adapter(link, payload, pace)
            for _ in range(I):
                if cut == self.L:
                    loss, _ = link.recv(K_LOSS, torch.float32, (1,))
                    if not torch.isfinite(loss).all():
                        raise ProtocolError(f"loss {float(loss[0])} is not finite")
                    inq.put(("step", loss, 0.0, moved))
                    continue

                def check(shp):
                    if len(shp) != 3 or shp[2] != self.H or not (1 <= shp[0] <= cfg.batch_size
                                                                 and 1 <= shp[1] <= cfg.seq_len):
                        raise ProtocolError(f"smashed data of shape {shp}: expected (<= {cfg.batch_size}, "
                                            f"<= {cfg.seq_len}, {self.H})")
                hid, t_up = link.recv(K_HIDDEN, self.wire, check=check)
                labels, _ = link.recv(K_LABELS, torch.int64, hid.shape[:2])
                am = link.recv(K_MASK, None, hid.shape[:2])[0] if cfg.train.send_attention_mask else None
                inq.put(("step", (hid, labels, am), t_up, moved))
                grad = outq.get()
                if grad is _RELEASE:
                    return
                if grad is not None:
                    link.send(grad, K_GRAD, pace)
            stats, _ = link.recv(K_STATS, torch.float64, (I, 2))
            incoming, back = recv_adapter(link, {k: self.node.params[k] for k in d_own})
            if not all(torch.isfinite(t).all() for t in [*incoming["params"].values(),
                                                         *(v for st in incoming["opt"].values() for v in st.values())]):
                raise ProtocolError("the returned adapter holds values that are not finite")
            if link.pending():
                raise ProtocolError("bytes beyond the turn's last message: the device sent more than it announced")
            inq.put(("done", stats, incoming, back))
        except Exception as err:  # noqa: BLE001  LinkClosed, timeout, ProtocolError: the main thread leaves m out
            inq.put(("error", err))

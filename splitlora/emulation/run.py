"""End-to-end emulated split fine-tuning: Jetsons taking turns with a clock-controlled server over Markov channels.

:func:`emulated_training` really trains the split model under CARD or a benchmark policy and reports, per
device-round, the device, link and server time and the server energy the emulation measured, next to the cost
model's prediction for the same decisions, in any training mode (devices taking turns, or SplitFed / federated
LoRA rounds in parallel with a shared server); :func:`emulation_summary` totals them per policy.
Source: docs/model.md, "Emulated run" (the model: "Delay and energy", "Parallel schedule"); issues 4 and 13.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import pandas as pd

from splitlora import _validate as V
from splitlora.emulation.emulators import (EmulatedChannel, EmulatedDevice, ServerClock, count_step_flops,
                                           flop_counter, measure_host_flops_per_s)
from splitlora.errors import InvalidParameterError
from splitlora.gpu import EmulatedBackend
from splitlora.model.baselines import POLICIES, run_policies, run_policies_rounds
from splitlora.model.hardware import CHANNEL_STATES, load_channel
from splitlora.model.profile import ATTN_TARGETS, profile_model
from splitlora.model.scenario import Scenario
from splitlora.model.system import CostModel, Workload
from splitlora.training.federated import MODES, run_parallel
from splitlora.training.models import load_model_and_tokenizer
from splitlora.training.node import payload_bytes
from splitlora.training.trainer import SplitTrainConfig, SplitTrainer

DEFAULT_POLICIES = ("CARD", "server-only", "device-only", "fixed cut", "random cut", "CARD cut, f_max",
                    "CARD clock, fixed cut")


def arithmetic_batches(tokenizer, n_batches: int, batch_size: int, seq_len: int, seed: int = 0):
    """``n_batches`` mini-batches of byte-tokenised sums ("12+345=357;..."), seeded.

    Each is ``{"input_ids", "labels", "attention_mask"}`` of shape (batch_size, seq_len), right-padded,
    labels -100 on padding.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        texts = []
        for _ in range(batch_size):
            parts, length = [], 0
            while length < seq_len:
                a, b = rng.integers(0, 1000, size=2)
                parts.append(f"{a}+{b}={a + b};")
                length += len(parts[-1])
            texts.append("".join(parts))
        enc = tokenizer(texts, max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "labels": labels, "attention_mask": enc["attention_mask"]})
    return out


def adapter_payload_bytes(trainer) -> int:
    """Bytes of the device-side LoRA adapter and its AdamW state as ``torch.save`` writes them (0 if none)."""
    owned = list(trainer.device.owned)
    return payload_bytes(trainer.device.export(owned)) if owned else 0


#: The emulated run's default scenario: the offline tiny Llama's 4 decoder blocks, short sequences, fp32 weights and
#: wire (what the trainer really computes), two mini-batches per device per turn.
EMULATION_SCENARIO = Scenario(granularity="block", seq_len=128, steps_per_round=2, param_bytes=4, wire_bytes=4)

#: The schedule each training mode is emulated under: its mini-batches run device, link and server one after the
#: other, so the pipelined schedules are not emulated (docs/model.md "Schedules").
MODE_SCHEDULES = {"sequential": "sequential", "splitfed": "parallel", "splitfed_v1": "parallel", "fedlora": "parallel"}


def schedule_of(mode: str) -> str:
    """The schedule a training mode is emulated under (:data:`MODE_SCHEDULES`). Raises InvalidParameterError for a
    mode not in :data:`splitlora.training.federated.MODES`."""
    V.check_choice("mode", mode, MODES)
    return MODE_SCHEDULES[mode]


def emulated_training(policies=None, scenario: Scenario | None = None, *, mode: str = "sequential", rounds: int = 4,
                      seed: int = 0, channel_initial: str | None = None, lr: float = 1e-3, model=None, tokenizer=None,
                      backend=None, real_time: bool = False, progress: bool = False) -> pd.DataFrame:
    """Train the split model under each policy on emulated hardware; measured vs predicted per device-round.

    Args:
        policies: names from :data:`splitlora.model.baselines.POLICIES` (each gets a fresh trainer, same data,
            same channel realisation); default :data:`DEFAULT_POLICIES` (fedlora: ``("device-only",)``, the only
            one allowed there: federated LoRA has no cut and no server, every device trains at c = L).
        mode: a training mode of :data:`splitlora.training.federated.MODES`. ``"sequential"``: the devices take
            turns (:meth:`SplitTrainer.step`), decisions of :func:`~splitlora.model.baselines.run_policies`,
            predicted by :meth:`CostModel.evaluate`. ``"splitfed"``, ``"splitfed_v1"``, ``"fedlora"``: the
            devices of a round train in parallel (:func:`~splitlora.training.federated.run_parallel`, one call
            per round); each round's cut layers and clock shares f_m come from
            :func:`~splitlora.model.baselines.run_policies_rounds` (parallel CARD); device m's server work runs
            on its own emulated share, an :class:`EmulatedBackend` whose clock table is {f_m} (time C / f_m,
            energy kappa C f_m^2, :func:`share_clock`); its delay is device + link + hand-over + server time, the
            round's delay the max over devices, its energy the sum; predicted by
            :meth:`CostModel.parallel_round`. fedlora trains every device whatever its memory (``fits_memory``
            says whether Mem_d(L) fits). A round with an infeasible decision is reported and not trained.
        scenario: a :class:`~splitlora.model.scenario.Scenario` (default :data:`EMULATION_SCENARIO`): its devices
            take turns in this order each round (parallel modes: train at once), ``steps_per_round`` I
            mini-batches of ``batch_size`` x ``seq_len`` tokens per turn, LoRA of rank ``lora_rank`` on q/k/v/o
            (alpha = 2r, no dropout), cut points of its ``granularity``, CARD's ``w`` and ``discrete_clocks``,
            ``compute_scale`` on every board's clock. Its
            ``model`` is not used (the trained ``model`` is), ``param_bytes`` / ``wire_bytes`` must be 4 (the
            trainer's fp32 weights and wire), and ``schedule`` must be the mode's (:data:`MODE_SCHEDULES`:
            "sequential" for sequential, "parallel" for the others).
        rounds: N. seed: data, channel, LoRA init, random cut.
        channel_initial: start state of every channel, or None (stationary draw).
        lr: AdamW learning rate. model, tokenizer: a ``*ForCausalLM`` and its tokenizer (default: the offline
            tiny Llama, seeded). backend: server GPU backend (default: a fresh emulated one per policy; parallel
            modes: must be None, a share is not a GPU clock).
        real_time: devices, channels and the emulated server sleep so wall time follows the emulated time
            (parallel modes: one sleep per round, up to the round's delay).
        progress: print one line per policy.
    Returns:
        One row per policy x round x device, columns: policy, round, device, device_name, board, channel_state,
        rate_mbps, feasible, cut_layer, frequency_hz (decided), applied_clock_hz, loss (mean of the turn),
        device_flops / device_flops_pred (FLOP per turn), device_time_s / _pred_s, device_time_wall_scaled_s,
        link_time_s / _pred_s, handover_bytes / _pred, handover_time_s / _pred_s, server_cycles / _pred,
        server_time_s / _pred_s, delay_s / _pred_s, energy_j / _pred_j, delay_diff_s, delay_rel_diff,
        energy_diff_j, energy_rel_diff, wall_time_s (host seconds of the turn). Measured = the emulation's
        backends; *_pred = :class:`CostModel` for the same decisions; rel_diff = measured / predicted - 1.
        Parallel modes add the columns mode (first), fits_memory (Mem_d(c) <= M_d), round_delay_s / _pred_s,
        round_energy_j / _pred_j (the round's, on each of its rows); frequency_hz is device m's share f_m,
        wall_time_s the round's host seconds; handover_bytes is the trained adapter sent up, handover_time_s
        also counts the round's global adapter received before (without AdamW moments in round 0).
    Raises:
        ValueError: bad argument (named), unknown policy or device, a mode with a schedule it does not run under,
            a policy other than "device-only" with fedlora, a backend or P0 > 0 with a parallel mode; all before
            any training.
        DeviceMemoryError: never for a policy's feasible decision (infeasible ones are reported, not run).
    """
    from peft import LoraConfig


    sc = EMULATION_SCENARIO if scenario is None else scenario
    parallel = schedule_of(mode) != "sequential"
    if sc.schedule != MODE_SCHEDULES[mode]:
        raise InvalidParameterError(
            f"scenario.schedule={sc.schedule!r} is invalid with mode={mode!r}: mode={mode!r} needs schedule "
            f"{MODE_SCHEDULES[mode]!r} (allowed: {MODE_SCHEDULES}; the emulation runs a mini-batch's device, link and "
            "server work one after the other, so the pipelined schedules are not emulated)")
    if policies is None:
        policies = ("device-only",) if mode == "fedlora" else DEFAULT_POLICIES
    policies = tuple(policies)
    for p in policies:
        V.check_choice("policies", p, POLICIES)
    if mode == "fedlora" and policies != ("device-only",):
        raise InvalidParameterError(f"policies={policies!r} is invalid with mode='fedlora': must be ('device-only',) "
                                    "(federated LoRA has no cut and no server: every device trains at c = L)")
    if parallel and backend is not None:
        raise InvalidParameterError(f"backend={backend!r} is invalid with mode={mode!r}: must be None (each device's "
                                    "server work runs on an emulated clock share, which is not a GPU clock)")
    for name in ("param_bytes", "wire_bytes"):
        V.check_choice(f"scenario.{name}", getattr(sc, name), (4,))
    V.check_int_range("rounds", rounds, 1, 10**6)
    V.check_int_range("scenario.seq_len", sc.seq_len, 2, 1 << 16)
    devices, steps_per_round, batch_size, seq_len = sc.devices, sc.steps_per_round, sc.batch_size, sc.seq_len
    lora_rank, granularity, w = sc.lora_rank, sc.granularity, sc.w
    server = sc.hardware_profiles().server(sc.server)
    if parallel and server.static_power_w != 0:
        raise InvalidParameterError(f"server static_power_w={server.static_power_w!r} is invalid with mode={mode!r}: "
                                    "must be 0 (docs/model.md \"Parallel schedule\")")
    if model is None:
        model, tokenizer = load_model_and_tokenizer(seed=seed)
    elif tokenizer is None:
        raise InvalidParameterError("tokenizer=None is invalid with a model: must give the model's tokenizer")

    channel_spec = load_channel()
    profile = profile_model(model.config, batch_size=batch_size, seq_len=seq_len, granularity=granularity,
                            lora_rank=lora_rank, lora_targets=ATTN_TARGETS, param_bytes=4, wire_bytes=4,
                            activation_bytes=4, name="trained model")
    cost = CostModel.from_profile(profile, server, Workload(steps_per_round, schedule=MODE_SCHEDULES[mode]))
    specs = [d.scaled(sc.compute_scale) for d in sc.device_specs().values()]
    P = np.array([s.flops_per_s for s in specs])
    Mem = np.array([s.training_memory_bytes for s in specs])
    host_flops = measure_host_flops_per_s()
    data = [arithmetic_batches(tokenizer, rounds * steps_per_round, batch_size, seq_len, seed=seed + 1 + m)
            for m in range(len(devices))]
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(ATTN_TARGETS))

    rows = []
    for policy in policies:
        t_policy = time.perf_counter()
        trainer = SplitTrainer(model, lora, SplitTrainConfig(lr=lr, granularity=granularity, seed=seed))
        if trainer.num_units != cost.n_cuts:
            raise RuntimeError(f"trainer has {trainer.num_units} cut units but the profile {cost.n_cuts}")
        turn_sleeps = real_time and not parallel  # parallel modes sleep once per round (_parallel_round)
        channel = EmulatedChannel(channel_spec, len(devices), seed=seed, initial=channel_initial, real_time=turn_sleeps)
        clock = None if parallel else ServerClock(server, backend, real_time=real_time)
        emus = [EmulatedDevice(s, profile.device_memory_bytes, real_time=turn_sleeps, host_flops_per_s=host_flops)
                for s in specs]
        for n in range(rounds):
            if n:
                channel.advance()
            R = np.array([channel.rate_bps(m) for m in range(len(devices))])
            if parallel:
                rows += _parallel_round(policy, mode, n, emus, channel, server, trainer, cost, data, R, Mem, sc,
                                        seed, real_time)
                continue
            dec = run_policies(cost, P, R, R, Mem, w, seed=seed + n, discrete_clocks=sc.discrete_clocks,
                               policies=(policy,))[policy]
            for m, emu in enumerate(emus):
                rows.append(_turn(policy, n, m, emu, channel, clock, trainer, cost, data[m], dec, R[m],
                                  steps_per_round))
        if progress:
            print(f"[emulated_training] {policy}: {time.perf_counter() - t_policy:.1f} s")
    return pd.DataFrame(rows)


def _turn(policy, n, m, emu, channel, clock, trainer, cost, batches, dec, rate, I):
    """Run one device's turn; return its row."""
    c, f = int(dec.cut_layer[m]), float(dec.frequency_hz[m])
    row = {"policy": policy, "round": n, "device": m, "device_name": emu.spec.name, "board": emu.spec.board,
           "channel_state": CHANNEL_STATES[int(channel.states[m])], "rate_mbps": rate / 1e6,
           "feasible": bool(dec.feasible[m]), "cut_layer": c, "frequency_hz": f}
    if not dec.feasible[m]:
        return row
    emu.check_cut(c)
    wall0 = time.perf_counter()
    dev_flops = dev_time = dev_wall = link = 0.0
    losses = []
    with clock.turn(f if c < cost.n_cuts else 0.0) as turn:
        for i in range(I):
            batch = batches[(n * I + i) % len(batches)]
            log, fd, fs = count_step_flops(trainer, batch, m, c, n)
            turn.run_flops(fs)
            td = emu.compute_time_s(fd)
            emu.hold(td, log.device_time_s)
            dev_flops, dev_time, dev_wall = dev_flops + fd, dev_time + td, dev_wall + log.device_time_s
            link += channel.transfer(log.bytes_up, m) + channel.transfer(log.bytes_down, m)
            losses.append(log.loss)
    hand_bytes = adapter_payload_bytes(trainer)
    hand_time = channel.transfer(hand_bytes, m) + channel.transfer(hand_bytes, m)  # received before, sent after
    # prediction for the same decision and rate
    P, r_up, r_down = np.array([emu.flops_per_s]), np.array([rate]), np.array([rate])  # one rate each way
    delay_pred, energy_pred = (float(x[0]) for x in cost.evaluate(np.array([c]), np.array([f if c < cost.n_cuts
                                                                                            else cost.f_max_hz]),
                                                                   P, r_up, r_down))
    t_d, t_l, t_h = (float(a[0, c]) for a in cost.stage_times_s(P, r_up, r_down))
    dev_pred, link_pred, hand_pred = I * t_d, I * t_l, t_h
    srv_time_pred = float(cost.server_delay_s(c, f)) if c < cost.n_cuts else 0.0
    delay = dev_time + link + hand_time + turn.time_s
    row.update({
        "applied_clock_hz": turn.applied_hz, "loss": float(np.mean(losses)),
        "device_flops": dev_flops, "device_flops_pred": I * float(cost.device_flops[c]),
        "device_time_s": dev_time, "device_time_pred_s": dev_pred,
        "device_time_wall_scaled_s": emu.wall_scaled_time_s(dev_wall),
        "link_time_s": link, "link_time_pred_s": link_pred,
        "handover_bytes": hand_bytes, "handover_bytes_pred": cost.handover_bits[c] / 8.0,
        "handover_time_s": hand_time, "handover_time_pred_s": hand_pred,
        "server_cycles": turn.cycles, "server_cycles_pred": I * float(cost.server_cycles[c]),
        "server_time_s": turn.time_s, "server_time_pred_s": srv_time_pred,
        "delay_s": delay, "delay_pred_s": delay_pred, "energy_j": turn.energy_j, "energy_pred_j": energy_pred,
        "delay_diff_s": delay - delay_pred, "delay_rel_diff": _rel(delay, delay_pred),
        "energy_diff_j": turn.energy_j - energy_pred, "energy_rel_diff": _rel(turn.energy_j, energy_pred),
        "wall_time_s": time.perf_counter() - wall0,
    })
    return row


def share_clock(server, share_hz: float) -> ServerClock:
    """A :class:`ServerClock` for one device's share f_m of the server clock under the parallel schedules: an
    :class:`EmulatedBackend` whose clock table is {f_m} (kappa and P0 of ``server``), so ``turn(f_m)`` charges C
    cycles C / f_m seconds and kappa C f_m^2 joules. A share has no lower bound (docs/model.md "Parallel schedule"),
    hence a table of its own rather than the GPU's; the table holds f_m to 1 Hz (MHz with 6 decimals)."""
    V.check_positive("share_hz", share_hz)
    return ServerClock(server, EmulatedBackend(kappa=server.kappa, f_min_hz=share_hz, f_max_hz=share_hz,
                                               step_hz=share_hz, static_power_w=server.static_power_w))


def _parallel_round(policy, mode, n, emus, channel, server, trainer, cost, data, R, Mem, sc, seed, real_time):
    """Decide and run round n of a parallel mode (all devices at once); return its M rows."""
    M, L, I = len(emus), cost.n_cuts, cost.iterations
    P = np.array([e.flops_per_s for e in emus])
    if mode == "fedlora":  # no cut, no server: every device at c = L; memory is reported (fits_memory), not enforced
        c, f, feasible = np.full(M, L), np.zeros(M), np.ones(M, dtype=bool)
    else:
        dec = run_policies_rounds(cost, P[None], R[None], R[None], Mem[None], sc.w, seed=seed + n,
                                  discrete_clocks=sc.discrete_clocks, policies=(policy,))[policy]
        c, f, feasible = dec.cut_layer[0].astype(int), dec.frequency_hz[0].astype(float), dec.feasible[0]
    run = bool(feasible.all())
    fits = cost.feasible(Mem)[np.arange(M), np.clip(c, 0, L)] & (c >= 0)
    rows = [{"mode": mode, "policy": policy, "round": n, "device": m, "device_name": e.spec.name,
             "board": e.spec.board, "channel_state": CHANNEL_STATES[int(channel.states[m])], "rate_mbps": R[m] / 1e6,
             "feasible": bool(feasible[m]), "fits_memory": bool(fits[m]), "cut_layer": int(c[m]),
             "frequency_hz": float(f[m])} for m, e in enumerate(emus)]
    if not run:  # a round whose decision does not fit is reported, not trained (run_parallel resumes at round ends)
        trainer.global_step += M * I
        return rows
    if mode != "fedlora":
        for m, e in enumerate(emus):
            e.check_cut(int(c[m]))
    flops, upload = [[] for _ in range(M)], [0] * M

    @contextmanager
    def counted(n_, m, i):  # around each split step of run_parallel: its FLOPs, then device m's adapter as trained
        with flop_counter() as fc:
            yield
        flops[m].append(fc)
        if i == I - 1:
            upload[m] = adapter_payload_bytes(trainer)

    wall0, first = time.perf_counter(), len(trainer.logs)
    run_parallel(trainer, data, lambda n_, m: int(c[m]), n + 1, [I] * M, mode, step_context=counted)
    logs, wall = trainer.logs[first:], time.perf_counter() - wall0
    T_round, E_round, T_pred, E_pred = (a.reshape(-1) for a in cost.parallel_round(c[None], f[None], P[None],
                                                                                     R[None], R[None]))
    t_d, t_l, t_h = (a[np.arange(M), c] for a in cost.stage_times_s(P, R, R))
    for m, (row, emu) in enumerate(zip(rows, emus)):
        mine = [x for x in logs if x.device == m]
        dev_flops = sum(x.device for x in flops[m])
        srv_flops = sum(x.server for x in flops[m])
        dev_time = emu.compute_time_s(dev_flops)
        link = sum(channel.transfer(x.bytes_up, m) + channel.transfer(x.bytes_down, m) for x in mine)
        # hand-over: the round's global device-side adapter down (run_parallel logs 2 x its size), the trained one up
        download, hand_bytes = sum(x.handover_bytes for x in mine) // 2, upload[m]
        hand_time = channel.transfer(download, m) + channel.transfer(hand_bytes, m)
        if c[m] < L:
            with share_clock(server, float(f[m])).turn(float(f[m])) as turn:
                turn.run_flops(srv_flops)
            applied, cycles, srv_time, energy = turn.applied_hz, turn.cycles, turn.time_s, turn.energy_j
        else:
            applied = cycles = srv_time = energy = 0.0
        delay = dev_time + link + hand_time + srv_time
        row.update({
            "applied_clock_hz": applied, "loss": float(np.mean([x.loss for x in mine])),
            "device_flops": dev_flops, "device_flops_pred": I * float(cost.device_flops[c[m]]),
            "device_time_s": dev_time, "device_time_pred_s": I * float(t_d[m]),
            "device_time_wall_scaled_s": emu.wall_scaled_time_s(sum(x.device_time_s for x in mine)),
            "link_time_s": link, "link_time_pred_s": I * float(t_l[m]),
            "handover_bytes": hand_bytes, "handover_bytes_pred": cost.handover_bits[c[m]] / 8.0,
            "handover_time_s": hand_time, "handover_time_pred_s": float(t_h[m]),
            "server_cycles": cycles, "server_cycles_pred": I * float(cost.server_cycles[c[m]]),
            "server_time_s": srv_time, "server_time_pred_s": float(cost.server_delay_s(c[m], f[m])),
            "delay_s": delay, "delay_pred_s": float(T_pred[m]), "energy_j": energy, "energy_pred_j": float(E_pred[m]),
            "delay_diff_s": delay - float(T_pred[m]), "delay_rel_diff": _rel(delay, float(T_pred[m])),
            "energy_diff_j": energy - float(E_pred[m]), "energy_rel_diff": _rel(energy, float(E_pred[m])),
            "wall_time_s": wall,
        })
    round_delay, round_energy = max(r["delay_s"] for r in rows), sum(r["energy_j"] for r in rows)
    for row in rows:
        row.update({"round_delay_s": round_delay, "round_delay_pred_s": float(T_round[0]),
                    "round_energy_j": round_energy, "round_energy_pred_j": float(E_round[0])})
    if real_time:
        time.sleep(max(0.0, round_delay - (time.perf_counter() - wall0)))
    return rows


def _rel(measured: float, predicted: float) -> float:
    if predicted == 0:
        return 0.0 if measured == 0 else float("inf")
    return measured / predicted - 1.0


def emulation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per policy, over its feasible device-rounds: totals of measured and predicted delay and energy, their
    relative differences, each component's relative difference, the last mean loss, the feasible fraction, the run's
    delay (run_delay_s, run_delay_pred_s: the sum of the turns' delays when devices take turns, of the rounds'
    delays, each the slowest device's, in the parallel modes) and CARD's measured reductions against the policy
    (1 - CARD / policy on the run's delay and the server energy; NaN when the policy's total is 0). Parallel modes
    (a ``round_delay_s`` column) add the totals over trained rounds of the round delay and energy, measured and
    predicted (round_delay_s, round_delay_pred_s, round_delay_rel_diff, and round_energy_* likewise).
    """
    rows = []
    for policy, g in table.groupby("policy", sort=False):
        ok = g[g.feasible]
        row = {"policy": policy, "feasible_fraction": float(g.feasible.mean()), "device_rounds": len(g),
               "final_loss": float(ok.sort_values(["round", "device"]).loss.iloc[-1]) if len(ok) else np.nan}
        for q, unit in (("delay", "s"), ("energy", "j"), ("device_time", "s"), ("link_time", "s"),
                        ("handover_time", "s"), ("server_time", "s")):
            meas, pred = float(ok[f"{q}_{unit}"].sum()), float(ok[f"{q}_pred_{unit}"].sum())
            row[f"{q}_{unit}"], row[f"{q}_pred_{unit}"] = meas, pred
            row[f"{q}_rel_diff"] = _rel(meas, pred)
        row["device_time_wall_scaled_s"] = float(ok.device_time_wall_scaled_s.sum())
        row["run_delay_s"], row["run_delay_pred_s"] = row["delay_s"], row["delay_pred_s"]
        if "round_delay_s" in g:
            per_round = g.dropna(subset=["round_delay_s"]).drop_duplicates("round")
            for q, unit in (("round_delay", "s"), ("round_energy", "j")):
                meas, pred = float(per_round[f"{q}_{unit}"].sum()), float(per_round[f"{q}_pred_{unit}"].sum())
                row[f"{q}_{unit}"], row[f"{q}_pred_{unit}"], row[f"{q}_rel_diff"] = meas, pred, _rel(meas, pred)
            row["run_delay_s"], row["run_delay_pred_s"] = row["round_delay_s"], row["round_delay_pred_s"]
        rows.append(row)
    out = pd.DataFrame(rows)
    if "CARD" in set(out.policy):
        card = out[out.policy == "CARD"].iloc[0]
        for q, col in (("delay", "run_delay_s"), ("energy", "energy_j")):
            out[f"card_{q}_reduction"] = np.where(out[col] > 0, 1.0 - card[col] / out[col].where(out[col] > 0, 1.0),
                                                  np.nan)
    return out

"""Convergence under device heterogeneity: sequential split learning against SplitFed and federated LoRA (notebook
``convergence_heterogeneity``; docs/split-training.md, "Training modes").

:func:`prepare_convergence` loads the model, GSM8K and the held-out set; :func:`partition` cuts the training records
into device shards (IID, or Dirichlet over bins of reasoning-step count; shares equal or skewed toward the slow
devices); :func:`plan_rounds` gives each mode's CARD decisions under Markov channels and its modelled round delay;
:func:`convergence_curves` trains every mode and records the held-out answer loss per round and modelled time.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd

from splitlora._validate import check_choice, check_int_range, check_positive
from splitlora.errors import InvalidParameterError
from splitlora.model.card import best_clock_hz, card
from splitlora.model.hardware import CHANNEL_STATES, load_channel, load_devices
from splitlora.model.profile import ATTN_TARGETS, SHIPPED_MODELS
from splitlora.model.scenario import DEVICE_NAMES, Scenario, channel_states

MODES = ("sequential", "splitfed", "fedlora")
PARTITIONS = ("iid", "dirichlet")
SHARES = ("equal", "slow")
#: reasoning-step bins of the non-IID partition: 1-2, 3, 4, 5 or more lines before "####"
STEP_BIN_EDGES = (3, 4, 5)


def reasoning_steps(answer: str) -> int:
    """Reasoning steps of a GSM8K answer: its non-empty lines before the ``#### <number>`` line."""
    body = answer.split("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def step_bins(answers: Sequence[str], edges: Sequence[int] = STEP_BIN_EDGES) -> np.ndarray:
    """Bin index of each answer by reasoning steps: 0 for < edges[0], k for edges[k-1] <= steps < edges[k], ..."""
    return np.searchsorted(np.asarray(edges), [reasoning_steps(a) for a in answers], side="right")


def device_shares(kind: str, num_devices: int, skew: float = 2.0) -> np.ndarray:
    """Fraction of the training records each device holds, shape (M,): ``"equal"``, or ``"slow"``: proportional to
    skew^m for devices m = 0..M-1 ordered fastest to slowest (data/hardware.yaml: Device 1 .. Device 5)."""
    check_choice("shares", kind, SHARES)
    check_positive("skew", skew)
    w = np.ones(num_devices) if kind == "equal" else float(skew) ** np.arange(num_devices)
    return w / w.sum()


def partition(bins: np.ndarray, shares: Sequence[float], kind: str = "iid", alpha: float = 0.3,
              seed: int = 0) -> list[np.ndarray]:
    """Record indices per device. Device m gets floor(share_m x n) records (the remainder to the last). ``"iid"``:
    a random permutation cut by the shares. ``"dirichlet"``: device m draws its bin mixture p_m ~ Dir(alpha x
    global bin frequencies x number of bins) and fills its shard by drawing bins from p_m, each record without
    replacement (an exhausted bin drops out and p_m is renormalised); small alpha, strong skew (Hsu et al. 2019,
    arXiv:1909.06335, over bins of reasoning steps instead of classes). Raises InvalidParameterError for a bad
    kind, share or alpha."""
    check_choice("partition", kind, PARTITIONS)
    check_positive("alpha", alpha)
    shares = np.asarray(shares, dtype=float)
    check_positive("shares", shares)
    bins = np.asarray(bins)
    n = len(bins)
    counts = np.floor(shares / shares.sum() * n).astype(int)
    counts[-1] = n - counts[:-1].sum()
    rng = np.random.default_rng(seed)
    if kind == "iid":
        perm = rng.permutation(n)
        return [np.sort(a) for a in np.split(perm, np.cumsum(counts)[:-1])]
    K = int(bins.max()) + 1
    pools = [list(rng.permutation(np.flatnonzero(bins == k))) for k in range(K)]
    freq = np.array([len(p) for p in pools], dtype=float) / n
    out = []
    for m, c in enumerate(counts):
        p = rng.dirichlet(alpha * K * np.maximum(freq, 1e-12))
        mine = []
        for _ in range(c):
            avail = np.array([len(pool) > 0 for pool in pools])
            q = np.where(avail, p, 0.0)
            q = q / q.sum() if q.sum() > 0 else avail / avail.sum()
            mine.append(pools[rng.choice(K, p=q)].pop())
        out.append(np.sort(np.array(mine, dtype=int)))
    return out


def steps_per_device(shares: Sequence[float], steps_per_round: int) -> list[int]:
    """I_m, mini-batches device m trains per round: its share of the round's M x I mini-batches, at least 1 (a
    device with more data trains more per round, one pass over its data per fixed number of rounds)."""
    shares = np.asarray(shares, dtype=float)
    return [max(1, int(round(s * len(shares) * steps_per_round))) for s in shares / shares.sum()]


@dataclass
class ConvergenceSetup:
    """What every run shares (built by :func:`prepare_convergence`): the frozen base model and tokenizer, the
    analytic model's name (``architecture``), the training records (a ``datasets.Dataset``) and their step bins,
    the held-out mini-batches, the peft ``LoraConfig``, the :class:`~splitlora.training.trainer.SplitTrainConfig`,
    the devices, B, s, I and N."""
    model: object
    tokenizer: object
    architecture: str
    records: object
    bins: np.ndarray
    heldout: list
    lora: object
    config: object
    devices: tuple
    batch_size: int
    seq_len: int
    steps_per_round: int
    rounds: int
    info: dict = field(default_factory=dict)


def prepare_convergence(model_name_or_path: str = "smollm2-135m", data: str = "gsm8k", *,
                        devices: Sequence[str] = DEVICE_NAMES, n_train: int = 400, n_heldout: int = 64,
                        rounds: int = 6, steps_per_round: int = 2, batch_size: int = 4, seq_len: int = 192,
                        lora_rank: int = 8, lr: float = 2e-3, compute_dtype: str = "bfloat16",
                        granularity: str = "block", seed: int = 0) -> ConvergenceSetup:
    """Load the model (offline for ``"smollm2-135m"``) and the first ``n_train`` training / ``n_heldout`` test records
    of ``data`` (:func:`splitlora.training.data.load_gsm8k`); loss on answer tokens; held-out set sorted by length.
    Raises InvalidParameterError for a bad size or device name."""
    from peft import LoraConfig

    from splitlora.training.data import load_gsm8k, tokenize_batches
    from splitlora.training.models import load_model_and_tokenizer
    from splitlora.training.split import num_targets
    from splitlora.training.trainer import SplitTrainConfig

    devices = tuple(devices)
    known = load_devices()
    if not devices:
        raise InvalidParameterError(f"devices=() is invalid: must name at least one of {list(known)}")
    for d in devices:
        check_choice("devices", d, list(known))
    for name, v, lo, hi in (("n_train", n_train, 1, 7473), ("n_heldout", n_heldout, 1, 1319),
                            ("rounds", rounds, 1, 10**5), ("steps_per_round", steps_per_round, 1, 10**5),
                            ("batch_size", batch_size, 1, 4096), ("seq_len", seq_len, 8, 1 << 16)):
        check_int_range(name, v, lo, hi)
    if n_train < len(devices) * batch_size:
        raise InvalidParameterError(f"n_train={n_train} is invalid: must be >= devices x batch_size "
                                    f"({len(devices) * batch_size})")
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, seed=seed)
    records = load_gsm8k(data, split="train", limit=n_train)
    test = load_gsm8k(data, split="test", limit=n_heldout)
    lengths = [len(q) + len(a) for q, a in zip(test["question"], test["answer"])]
    test = test.select(sorted(range(len(test)), key=lengths.__getitem__))
    heldout = tokenize_batches(test, tokenizer, 8, 4 * seq_len, padding="longest", drop_last=False)
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(ATTN_TARGETS))
    cfg = SplitTrainConfig(lr=lr, granularity=granularity, compute_dtype=compute_dtype, seed=seed)
    key = str(model_name_or_path).lower()
    arch = key if key in SHIPPED_MODELS else str(model_name_or_path)
    return ConvergenceSetup(model, tokenizer, arch, records, step_bins(records["answer"]), heldout, lora, cfg,
                            devices, batch_size, seq_len, steps_per_round, rounds,
                            info=dict(train_records=len(records), heldout_records=len(test),
                                      heldout_tokens=sum(num_targets(b["labels"]) for b in heldout)))


def device_batches(setup: ConvergenceSetup, shards: Sequence[np.ndarray], seed: int = 0) -> list[list]:
    """Each device's mini-batches (B records, padded to the longest, shuffled with ``seed``) from its shard."""
    import warnings

    from splitlora.training.data import tokenize_batches

    out = []
    for m, idx in enumerate(shards):
        if len(idx) < setup.batch_size:
            raise InvalidParameterError(f"shard of {setup.devices[m]!r} holds {len(idx)} records: must hold at least "
                                        f"batch_size={setup.batch_size} (raise n_train)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*truncated.*")
            out.append(tokenize_batches(setup.records.select(idx.tolist()), setup.tokenizer, setup.batch_size,
                                        setup.seq_len, padding="longest", shuffle_seed=seed + m))
    return out


def scenario_of(setup: ConvergenceSetup, schedule: str, w: float) -> Scenario:
    """The analytic scenario of ``setup`` (its architecture, B, s, LoRA rank, I, devices) under ``schedule``."""
    return Scenario(model=setup.architecture, granularity=setup.config.granularity, batch_size=setup.batch_size,
                    seq_len=setup.seq_len, lora_rank=int(setup.lora.r), steps_per_round=setup.steps_per_round,
                    w=w, devices=setup.devices, schedule=schedule)


def fedlora_memory(setup: ConvergenceSetup) -> pd.DataFrame:
    """Which devices can hold the whole LoRA-adapted model for training (federated LoRA trains at c = L), by the
    memory model Mem_d(L) of :mod:`splitlora.model.profile` against each device's training memory.
    Columns: device, memory_needed_gb, training_memory_gb, fits."""
    sc = scenario_of(setup, "sequential", 0.5)
    need = sc.profile().device_memory_bytes[-1]
    _, M = sc.device_arrays()
    return pd.DataFrame({"device": list(setup.devices), "memory_needed_gb": need / 1e9,
                         "training_memory_gb": M / 1e9, "fits": need <= M})


def plan_rounds(setup: ConvergenceSetup, mode: str, steps: Sequence[int], *, w: float = 0.1, seed: int = 0,
                cuts: Sequence[int] | None = None) -> pd.DataFrame:
    """Each device-round's decisions and the modelled round delay of ``mode`` under Markov channels (seeded).

    sequential: CARD (:func:`splitlora.model.card.card`, the sequential schedule) per device-round, device m with its
    own I_m = ``steps[m]``; round delay = sum over devices (they take turns). splitfed: parallel CARD (cut layers and
    clock shares of each round, :func:`splitlora.model.parallel.card_parallel`) and the parallel schedule's round
    delay (:meth:`splitlora.model.system.CostModel.parallel_round`: round = slowest device, shared server).
    fedlora: c = L for every device (no server work), the same parallel delay model. ``cuts``: one fixed cut per
    device instead of CARD's (sequential: the clock is CARD's best for that cut; splitfed: the server's clock is
    shared equally by the devices with c < L, not allocated). Parallel CARD plans with the common I
    (``setup.steps_per_round``); each device's delay is then evaluated with its own I_m (an approximation when the
    shares are skewed).

    Returns one row per (round, device): round, device, channel_state, cut_layer, f_hz, steps, device_delay_s,
    round_delay_s (the round's, repeated on its rows).
    """
    check_choice("mode", mode, MODES)
    N, Md = setup.rounds, len(setup.devices)
    states = channel_states("Markov", N, Md, seed)
    R = load_channel().rates_bps()[states]
    sc = scenario_of(setup, "sequential" if mode == "sequential" else "parallel", w)
    cost = sc.cost_model()
    P, Mem = sc.device_arrays()
    P2, M2 = np.broadcast_to(P, (N, Md)), np.broadcast_to(Mem, (N, Md))
    L = cost.n_cuts
    if mode == "sequential":
        c, f, T = np.zeros((N, Md), int), np.zeros((N, Md)), np.zeros((N, Md))
        for m in range(Md):
            cm = replace(cost, iterations=int(steps[m]))
            if cuts is None:
                d = card(cm, P2[:, m], R[:, m], R[:, m], M2[:, m], w, discrete_clocks=sc.discrete_clocks)
                c[:, m], f[:, m] = d.cut_layer, d.frequency_hz
            else:
                c[:, m] = cuts[m]
                f[:, m] = best_clock_hz(cm, c[:, m], P2[:, m], R[:, m], R[:, m], w,
                                        discrete_clocks=sc.discrete_clocks)
            T[:, m] = cm.evaluate(c[:, m], np.where(c[:, m] < L, f[:, m], cm.f_max_hz), P2[:, m], R[:, m], R[:, m])[0]
        round_T = T.sum(1)
    else:
        if mode == "fedlora":
            c, f = np.full((N, Md), L), np.zeros((N, Md))
        elif cuts is None:
            from splitlora.model.parallel import card_parallel  # issue 12's parallel CARD

            d = card_parallel(cost, P2, R, R, M2, w, discrete_clocks=sc.discrete_clocks)
            c, f = np.asarray(d.cut_layer, dtype=int), np.asarray(d.frequency_hz, dtype=float)
        else:
            c = np.broadcast_to(np.asarray(cuts, dtype=int), (N, Md)).copy()
            f = np.where(c < L, cost.f_max_hz / np.maximum((c < L).sum(1, keepdims=True), 1), 0.0)
        T = np.zeros((N, Md))
        for m in range(Md):  # each device finishes after its own I_m mini-batches; the round ends with the last
            T[:, m] = replace(cost, iterations=int(steps[m])).parallel_round(c, f, P2, R, R)[2][:, m]
        round_T = T.max(1)
    rows = [dict(round=n, device=setup.devices[m], channel_state=CHANNEL_STATES[states[n, m]], cut_layer=int(c[n, m]),
                 f_hz=float(f[n, m]), steps=int(steps[m]), device_delay_s=float(T[n, m]),
                 round_delay_s=float(round_T[n])) for n in range(N) for m in range(Md)]
    return pd.DataFrame(rows)


def train_curve(setup: ConvergenceSetup, batches: list[list], plan: pd.DataFrame, mode: str, steps: Sequence[int],
                weights: Sequence[float], initial_loss: float | None = None) -> pd.DataFrame:
    """Train ``mode`` for ``setup.rounds`` rounds with the cuts of ``plan`` (:func:`plan_rounds`) and record the
    held-out answer loss after every round. Columns: round (0 = before training), heldout_loss, modelled_time_s
    (cumulative modelled delay at the round's end), train_loss (mean over the round's mini-batches).
    ``initial_loss``: the base model's held-out loss if already known (the same for every mode)."""
    from splitlora.training.evaluation import answer_loss
    from splitlora.training.trainer import SplitTrainer

    train_mode = {"sequential": "sequential", "splitfed": "splitfed", "fedlora": "fedlora"}[mode]
    cut = plan.pivot(index="round", columns="device", values="cut_layer")[list(setup.devices)].to_numpy()
    delay = plan.groupby("round")["round_delay_s"].first().to_numpy()
    cd = setup.config.compute_dtype
    trainer = SplitTrainer(setup.model, setup.lora, setup.config)
    if initial_loss is None:
        initial_loss = answer_loss(setup.model, setup.heldout, compute_dtype=cd)["loss"]
    rows = [dict(round=0, heldout_loss=float(initial_loss), modelled_time_s=0.0, train_loss=float("nan"))]
    for n in range(setup.rounds):
        before = len(trainer.logs)
        trainer.run(batches, lambda r, m: int(cut[r, m]), rounds=n + 1, steps_per_round=list(steps), mode=train_mode,
                    sample_weights=None if mode == "sequential" else list(weights))
        rows.append(dict(round=n + 1, heldout_loss=answer_loss(trainer, setup.heldout, compute_dtype=cd)["loss"],
                         modelled_time_s=float(delay[: n + 1].sum()),
                         train_loss=float(np.mean([x.loss for x in trainer.logs[before:]]))))
    return pd.DataFrame(rows)


def convergence_curves(setup: ConvergenceSetup, scenarios: Sequence[tuple[str, str]] = (("iid", "equal"),
                       ("dirichlet", "equal"), ("dirichlet", "slow")), modes: Sequence[str] = MODES, *,
                       alpha: float = 0.3, skew: float = 2.0, w: float = 0.1, cuts: Sequence[int] | None = None,
                       seed: int = 0, progress: bool = False):
    """Every (partition, shares) scenario x mode: held-out answer loss per round and per modelled wall-clock time.

    Returns ``(curves, plans, shards)``: curves (partition, shares, mode, round, heldout_loss, modelled_time_s,
    train_loss), plans (the :func:`plan_rounds` rows with partition, shares, mode) and shards (partition, shares,
    device, records, steps, and the share of each reasoning-step bin)."""
    for mode in modes:
        check_choice("modes", mode, MODES)
    from splitlora.training.evaluation import answer_loss

    curves, plans, shard_rows = [], [], []
    Md = len(setup.devices)
    base = answer_loss(setup.model, setup.heldout, compute_dtype=setup.config.compute_dtype)["loss"]
    for kind, share_kind in scenarios:
        shares = device_shares(share_kind, Md, skew)
        shards = partition(setup.bins, shares, kind, alpha, seed)
        steps = steps_per_device(shares, setup.steps_per_round)
        batches = device_batches(setup, shards, seed)
        weights = [float(len(s)) for s in shards]
        K = int(setup.bins.max()) + 1
        for m, idx in enumerate(shards):
            hist = np.bincount(setup.bins[idx], minlength=K) / max(len(idx), 1)
            shard_rows.append(dict(partition=kind, shares=share_kind, device=setup.devices[m], records=len(idx),
                                   steps=steps[m], **{f"bin_{k}": float(hist[k]) for k in range(K)}))
        for mode in modes:
            if progress:
                print(f"{kind}/{share_kind}: {mode}", flush=True)
            plan = plan_rounds(setup, mode, steps, w=w, seed=seed, cuts=cuts)
            curve = train_curve(setup, batches, plan, mode, steps, weights, base)
            tag = dict(partition=kind, shares=share_kind, mode=mode)
            curves.append(curve.assign(**tag))
            plans.append(plan.assign(**tag))
    order = ["partition", "shares", "mode"]
    curves = pd.concat(curves, ignore_index=True)
    plans = pd.concat(plans, ignore_index=True)
    return (curves[order + [c for c in curves.columns if c not in order]],
            plans[order + [c for c in plans.columns if c not in order]], pd.DataFrame(shard_rows))


def loss_at_time(curve: pd.DataFrame, t_s: float) -> float:
    """Held-out loss of one curve at modelled time ``t_s``: the last evaluation at or before it."""
    done = curve[curve.modelled_time_s <= t_s * (1 + 1e-12)]
    return float(done.heldout_loss.iloc[-1])


def time_to_loss(curve: pd.DataFrame, target: float) -> float:
    """Modelled time (s) at which one curve first reaches ``target`` held-out loss, linear between evaluations;
    inf if it never does."""
    t, y = curve.modelled_time_s.to_numpy(), curve.heldout_loss.to_numpy()
    for k in range(len(y)):
        if y[k] <= target:
            if k == 0:
                return float(t[0])
            return float(t[k - 1] + (t[k] - t[k - 1]) * (y[k - 1] - target) / (y[k - 1] - y[k]))
    return float("inf")


def race(curves: pd.DataFrame) -> pd.DataFrame:
    """Per scenario and mode: the loss after the same wall-clock budget (the shortest of the modes' total modelled
    times) and the time to reach the target loss (the highest of the modes' final losses, so every mode reaches
    it), with the ratio to the fastest mode. Columns: partition, shares, mode, budget_s, loss_at_budget,
    target_loss, time_to_target_s, time_vs_fastest, first (True for the mode that reaches the target first)."""
    rows = []
    for (kind, share), g in curves.groupby(["partition", "shares"], sort=False):
        per = {m: c.sort_values("round") for m, c in g.groupby("mode", sort=False)}
        budget = min(c.modelled_time_s.max() for c in per.values())
        target = max(c.heldout_loss.iloc[-1] for c in per.values())
        times = {m: time_to_loss(c, target) for m, c in per.items()}
        best = min(times.values())
        for m, c in per.items():
            rows.append(dict(partition=kind, shares=share, mode=m, budget_s=budget, loss_at_budget=loss_at_time(c, budget),
                             target_loss=target, time_to_target_s=times[m], time_vs_fastest=times[m] / best,
                             first=times[m] == best))
    return pd.DataFrame(rows)

"""Split LoRA training across processes and hosts on ``torch.distributed`` (docs/distributed.md).

Roles: rank 0 is the **server**, ranks 1..M are **devices** 0..M-1 (``RANK`` / ``WORLD_SIZE`` from
``torchrun`` or :func:`launch_local`). The result equals the in-process :class:`~splitlora.training.SplitTrainer`
for the same configuration and seed (``run_in_process``; tests), as long as LoRA dropout is 0 (each process
draws dropout masks from its own RNG).

Transport. The server hosts a ``TCPStore`` (bound to ``addr``, 127.0.0.1 unless named); each device joins by
incrementing its counter ``join/<m>`` and the two build a *pair* ``ProcessGroupGloo`` (size 2) under the prefix
``pair/<m>/<generation>``. There is no world-wide group, so a dead device breaks only its own pair; a device
that comes back joins under a new generation. Every message is an int64 header tensor
``[magic, dtype code, ndim, d0..d4, key, chunk bytes]`` followed by the payload bytes (uint8, possibly in
chunks); the receiver checks magic, dtype, shape and key before receiving the payload. Nothing is pickled.

Per turn (round n, device m, ``steps_per_round`` mini-batches): the server runs CARD (or the configured
schedule) for the device from the profile it reported and the round's channel state, sends the cut layer and
the device-side adapter (values and AdamW state), the device trains, and at the end returns the adapter and
its per-step timings. Between turns the server holds the whole adapter, so the hand-over to the next device
goes through it. A turn is a transaction: the server snapshots its state first, and on any error (peer
closed, ``timeout_s`` passed, protocol violation) restores the snapshot, waits ``join_timeout_s`` for the
device to rejoin and retries (``retries`` times), else skips the device for the round; a device that stays
away is skipped at once in later rounds unless it has rejoined. The server only accepts tensors named like
the device-side LoRA parameters of the turn's cut, with their shapes, so a device cannot write the
server-side adapter. Checkpoints (``torch.save`` to a temporary file + ``os.replace``, loaded with
``weights_only=True``): the server after each turn (everything needed to resume), each device after each turn.

Link emulation (a): with ``link.emulate`` every payload is sent in chunks paced so that its last byte leaves
at 8 bytes / rate after its header (rate = the round's channel-state rate x ``rate_scale``). Per step the
server logs bytes, the measured up-link time of the smashed data (receiver clock, header to last byte), the
device's measured down-link time, and the model's 8 S / R.

Limits: gloo only (an NCCL pair group is not implemented; tensors cross the wire from CPU memory); one
server; a gloo recv that times out closes the pair, so a device waiting for its turn uses ``idle_timeout_s``;
a server restart needs the same ``addr:port``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from ._validate import check_choice, check_int_range, check_positive
from .training import LoraNode, SplitTrainConfig, SplitTrainer, StepLog, trainable_names

CHECKPOINT_VERSION = 1
MAGIC = 0x5B17_104A
HEADER_LEN = 10  # magic, dtype code, ndim, d0..d4, key, chunk bytes
MAX_DIMS = 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.float64, torch.bool,
          torch.uint8]
# message keys (names of adapter tensors use crc32 of "<name>/<field>")
K_CTRL, K_RATES, K_HELLO, K_PROFILE, K_HIDDEN, K_LABELS, K_MASK, K_GRAD, K_LOSS, K_STATS, K_COUNT, K_ADAPTER = \
    range(1, 13)
TURN, STOP = 1, 2
ADAM_FIELDS = ("exp_avg", "exp_avg_sq", "step")


class ProtocolError(RuntimeError):
    """A message that is not what the receiver expects (dtype, shape, key, magic): the peer is dropped."""


# ============================================================================================ configuration
@dataclass(frozen=True)
class LinkConfig:
    """Channel states and their emulation.

    condition: "Good", "Normal", "Poor" (fixed) or "Markov" (per-device chains of data/channel.yaml) ["Normal"].
    seed: seed of the Markov chains [0]. emulate: pace every payload to the state's rate (rate limiter) [False].
    rate_scale: multiplies the channel model's rate for the emulation and the logged prediction (< 1 slows the
    link so transfers are measurable on a small model); CARD always sees the unscaled rate [1.0].
    """

    condition: str = "Normal"
    seed: int = 0
    emulate: bool = False
    rate_scale: float = 1.0

    def __post_init__(self):
        check_choice("link.condition", self.condition, ("Good", "Normal", "Poor", "Markov"))
        check_positive("link.rate_scale", self.rate_scale)


@dataclass(frozen=True)
class DistConfig:
    """Where and how the roles talk (not part of the training fingerprint).

    addr: address the server binds and devices connect to; loopback unless you name one ["127.0.0.1"].
    port: TCP port of the server's store (not torchrun's rendezvous port) [29500].
    timeout_s: longest wait for one message inside a turn (s) [60]. join_timeout_s: how long the server waits
    for a failed device to rejoin before skipping it (s) [30]. startup_timeout_s: wait for a device's first join
    (s) [300]. idle_timeout_s: a device's wait for its next turn (s) [3600]. retries: attempts after a failed
    turn [1]. checkpoint_dir: folder of ``server.pt`` / ``device<m>.pt``, None = no checkpoints [None].
    resume: load an existing checkpoint at start [True]. output_dir: where the server writes ``adapter.pt``,
    ``logs.json``, ``events.json`` and the PEFT ``adapter/`` folder [None].
    """

    addr: str = "127.0.0.1"
    port: int = 29500
    timeout_s: float = 60.0
    join_timeout_s: float = 30.0
    startup_timeout_s: float = 300.0
    idle_timeout_s: float = 3600.0
    retries: int = 1
    checkpoint_dir: str | None = None
    resume: bool = True
    output_dir: str | None = None

    def __post_init__(self):
        check_int_range("dist.port", self.port, 1, 65535)
        for k in ("timeout_s", "join_timeout_s", "startup_timeout_s", "idle_timeout_s"):
            check_positive(f"dist.{k}", getattr(self, k))
        check_int_range("dist.retries", self.retries, 0, 1000)


@dataclass(frozen=True)
class RunConfig:
    """One split-training run; the same file drives :func:`run_in_process` and the distributed roles.

    model: ``tiny_llama_config`` keyword arguments plus ``seed``, or ``{"name_or_path": ..., "seed": ...}``.
    lora: ``peft.LoraConfig`` keyword arguments. train: :class:`SplitTrainConfig` fields.
    batch_size, seq_len: B sequences of s tokens per mini-batch. batches_per_device: synthetic mini-batches each
    device holds (random tokens, seeded by ``data_seed`` and the device index; the second half of every second
    row is padding). devices: device names of data/hardware.yaml, one per device rank (their reported profile).
    rounds, steps_per_round: N rounds, I mini-batches per device per round. cut: "card" (CARD each round),
    an int (fixed) or a list per round of a cut per device. w: CARD's delay weight. card_scenario: None (CARD
    costs the trained model and workload) or :class:`~splitlora.experiments.Scenario` fields: CARD then decides
    for that scenario's model (e.g. Llama-3.2-1B, L' units, ``w`` from the scenario) and the trained model gets
    the cut round(c' L / L'), so a small model can stand in for the paper's. link: :class:`LinkConfig`.
    dist: :class:`DistConfig`.
    """

    model: dict = field(default_factory=lambda: {"hidden_size": 32, "num_layers": 2, "seed": 0})
    lora: dict = field(default_factory=lambda: {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                "target_modules": ["q_proj", "v_proj"]})
    train: SplitTrainConfig = SplitTrainConfig()
    batch_size: int = 2
    seq_len: int = 16
    batches_per_device: int = 4
    data_seed: int = 0
    devices: tuple = ("Device 3",)
    rounds: int = 2
    steps_per_round: int = 2
    cut: object = "card"
    w: float = 0.1
    card_scenario: dict | None = None
    link: LinkConfig = LinkConfig()
    dist: DistConfig = DistConfig()

    def __post_init__(self):
        for k in ("batch_size", "seq_len", "batches_per_device", "rounds", "steps_per_round"):
            check_int_range(k, getattr(self, k), 1, 10**9)
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise ValueError("devices=() is invalid: must name at least one device")
        if isinstance(self.cut, str):
            check_choice("cut", self.cut, ("card",))
        elif isinstance(self.cut, (list, tuple)):
            if len(self.cut) != self.rounds or any(len(r) != len(self.devices) for r in self.cut):
                raise ValueError(f"cut={self.cut!r} is invalid: must be {self.rounds} rounds x {len(self.devices)} cuts")
        else:
            check_int_range("cut", self.cut, 0, 10**6)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["devices"] = list(self.devices)
        d["train"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d["train"].items()}
        return d

    def fingerprint(self) -> int:
        """63-bit hash of everything that decides the training (not ``dist``, not ``train.progress``)."""
        d = self.to_dict()
        d.pop("dist")
        d["train"].pop("progress")
        digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def config_from_dict(d: dict) -> RunConfig:
    """Build a :class:`RunConfig` from a plain dict (YAML/JSON); unknown keys raise ValueError."""
    d = dict(d)
    known = {f.name for f in fields(RunConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"config keys {sorted(unknown)} are invalid: must be among {sorted(known)}")
    if "train" in d:
        t = dict(d["train"])
        if "betas" in t:
            t["betas"] = tuple(t["betas"])
        d["train"] = SplitTrainConfig(**t)
    if "link" in d:
        d["link"] = LinkConfig(**d["link"])
    if "dist" in d:
        d["dist"] = DistConfig(**d["dist"])
    return RunConfig(**d)


def load_config(path) -> RunConfig:
    """Read a run configuration from a YAML or JSON file."""
    import yaml

    return config_from_dict(yaml.safe_load(Path(path).read_text()) or {})


# ============================================================================================ shared pieces
def build_base_model(cfg: RunConfig):
    """The frozen base model: the offline tiny Llama (``tiny_llama_config(**model)``) or ``name_or_path``."""
    from .models import load_model_and_tokenizer

    kw = dict(cfg.model)
    seed = int(kw.pop("seed", 0))
    name = kw.pop("name_or_path", None)
    return load_model_and_tokenizer(name, seed=seed, **({} if name else kw))[0]


def lora_config(cfg: RunConfig):
    from peft import LoraConfig

    return LoraConfig(**cfg.lora)


def device_batches(cfg: RunConfig, vocab_size: int) -> list[list[dict]]:
    """Synthetic mini-batches of every device: {input_ids, labels, attention_mask}, each (B, s), tokens in
    3..vocab_size-1."""
    vocab = int(vocab_size)
    out = []
    for m in range(cfg.num_devices):
        g = torch.Generator().manual_seed(cfg.data_seed * 1000 + m)
        batches = []
        for _ in range(cfg.batches_per_device):
            ids = torch.randint(3, vocab, (cfg.batch_size, cfg.seq_len), generator=g)
            mask = torch.ones_like(ids)
            mask[1::2, cfg.seq_len // 2:] = 0
            ids = ids.masked_fill(mask == 0, 0)
            batches.append({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask})
        out.append(batches)
    return out


def channel_rates(cfg: RunConfig):
    """(state names (N, M), model rates (N, M) bit/s) of every device-round."""
    import numpy as np

    from .experiments import channel_states
    from .hardware import CHANNEL_STATES, load_channel

    idx = channel_states(cfg.link.condition, cfg.rounds, cfg.num_devices, seed=cfg.link.seed)
    ch = load_channel()
    names = np.array(CHANNEL_STATES)[idx]
    return names, np.vectorize(ch.rate_bps)(names).astype(float)


def cost_model(cfg: RunConfig, hf_config):
    """(CARD's cost model, the trained model's profile): the cost model is that of this run's model and workload
    on the data/hardware.yaml server, or of ``card_scenario``."""
    from .hardware import load_server
    from .profile import ATTN_TARGETS, MLP_TARGETS, profile_model
    from .system import CostModel, Workload

    targets = [t for t in cfg.lora.get("target_modules", ATTN_TARGETS) if t in ATTN_TARGETS + MLP_TARGETS]
    wire = torch.empty(0, dtype=getattr(torch, cfg.train.wire_dtype)).element_size()
    prof = profile_model(hf_config, batch_size=cfg.batch_size, seq_len=cfg.seq_len, granularity=cfg.train.granularity,
                         lora_rank=int(cfg.lora.get("r", 8)), lora_targets=targets or ATTN_TARGETS,
                         param_bytes=4, wire_bytes=wire)
    if cfg.card_scenario is not None:
        from .experiments import Scenario

        return Scenario(**cfg.card_scenario).cost_model(), prof
    return CostModel.from_profile(prof, load_server(), Workload(cfg.steps_per_round)), prof


def decide_cut(cfg: RunConfig, model, n: int, m: int, flops_per_s: float, memory_bytes: float, rate_bps: float,
               num_units: int) -> int:
    """Cut layer (0..``num_units``) of device m in round n: the schedule, or CARD from the reported profile and
    the channel rate. ``model`` is :func:`cost_model`'s CostModel. Infeasible (no cut fits): 0 (server-only)."""
    if isinstance(cfg.cut, (list, tuple)):
        return int(cfg.cut[n][m])
    if not isinstance(cfg.cut, str):
        return int(cfg.cut)
    from .card import card

    w = cfg.w if cfg.card_scenario is None else cfg.card_scenario.get("w", 0.1)
    d = card(model, [flops_per_s], [rate_bps], [rate_bps], [memory_bytes], w, discrete=True)
    return round(max(int(d.cut_layer[0]), 0) * num_units / model.n_cuts)


def device_profile(cfg: RunConfig, m: int) -> tuple[float, float]:
    """(FLOP/s, training memory bytes) device m reports: its data/hardware.yaml entry."""
    from .hardware import load_device

    d = load_device(cfg.devices[m])
    return d.flops_per_s, d.training_memory_bytes


def planned_cuts(cfg: RunConfig) -> list[list[int]]:
    """Cut of every (round, device) when every device reports its configured profile."""
    from .split import num_units

    base = build_base_model(cfg)
    cm, _ = cost_model(cfg, base.config)
    _, rates = channel_rates(cfg)
    L = num_units(base, cfg.train.granularity)
    return [[decide_cut(cfg, cm, n, m, *device_profile(cfg, m), rates[n, m], L) for m in range(cfg.num_devices)]
            for n in range(cfg.rounds)]


def run_in_process(cfg: RunConfig, skip=()) -> SplitTrainer:
    """The same run with the in-process :class:`SplitTrainer`; ``skip``: (round, device) turns left out."""
    base = build_base_model(cfg)
    trainer = SplitTrainer(base, lora_config(cfg), cfg.train)
    data, cuts, I = device_batches(cfg, base.config.vocab_size), planned_cuts(cfg), cfg.steps_per_round
    for n in range(cfg.rounds):
        for m in range(cfg.num_devices):
            if (n, m) in set(map(tuple, skip)):
                continue
            for i in range(I):
                trainer.step(data[m][(n * I + i) % len(data[m])], m, cuts[n][m], n)
    return trainer


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _test_kill(step: int) -> None:
    """Test hook: ``SPLITLORA_TEST_KILL_AT=<global step>`` SIGKILLs this process at that step (mid-turn)."""
    at = os.environ.get("SPLITLORA_TEST_KILL_AT")
    if at is not None and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# ============================================================================================ wire
class Link:
    """Tensor messages to one peer of a pair process group: header, then payload (paced when a rate is given)."""

    def __init__(self, pg, peer: int, timeout_s: float, chunk_s: float = 0.005):
        self.pg, self.peer, self.timeout_s, self.chunk_s = pg, peer, timeout_s, chunk_s

    def _td(self, timeout_s=None):
        return datetime.timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s)

    def send(self, t: torch.Tensor, key: int, rate_bps: float = 0.0) -> int:
        """Send ``t`` (any dtype of ``DTYPES``, <= 5 dims); with ``rate_bps`` > 0 the payload leaves in chunks
        paced to that rate. Returns the payload bytes."""
        t = t.detach().to("cpu").contiguous()
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensor of {t.dim()} dims is invalid: must have at most {MAX_DIMS}")
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        n = flat.numel()
        chunk = n if rate_bps <= 0 else max(256, int(rate_bps / 8 * self.chunk_s))
        dims = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        hdr = torch.tensor([MAGIC, DTYPES.index(t.dtype), t.dim(), *dims, key, max(chunk, 1)], dtype=torch.int64)
        self.pg.send([hdr], self.peer, 0).wait(self._td())
        t0 = time.perf_counter()
        for off in range(0, n, max(chunk, 1)):
            end = min(off + chunk, n)
            if rate_bps > 0:
                delay = t0 + 8.0 * end / rate_bps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.pg.send([flat[off:end]], self.peer, 0).wait(self._td())
        return n

    def recv_header(self, timeout_s: float | None = None) -> tuple[list[int], float]:
        """Wait for the next header; returns it (checked for magic, dtype code, ndim) and its arrival time."""
        hdr = torch.empty(HEADER_LEN, dtype=torch.int64)
        self.pg.recv([hdr], self.peer, 0).wait(self._td(timeout_s))
        t0 = time.perf_counter()
        h = hdr.tolist()
        if h[0] != MAGIC or not 0 <= h[1] < len(DTYPES) or not 0 <= h[2] <= MAX_DIMS or any(d < 0 for d in h[3:8]):
            raise ProtocolError(f"bad header {h}")
        return h, t0

    def recv_payload(self, h: list[int], t0: float, key: int, dtype=None, shape=None, max_bytes: int = 1 << 31,
                     check=None, timeout_s: float | None = None):
        """Receive the payload of header ``h`` after checking key, dtype, shape (exact tuple, or ``check(shape)``
        raising) and size; returns (tensor, seconds from the header's arrival to the last payload byte)."""
        dt, shp = DTYPES[h[1]], tuple(h[3:3 + h[2]])
        if h[8] != key:
            raise ProtocolError(f"message key {h[8]}: expected {key}")
        if dtype is not None and dt != dtype:
            raise ProtocolError(f"message key {key} has dtype {dt}: expected {dtype}")
        if shape is not None and shp != tuple(shape):
            raise ProtocolError(f"message key {key} has shape {shp}: expected {tuple(shape)}")
        if check is not None:
            check(shp)
        numel = 1
        for d in shp:
            numel *= d
        nbytes = numel * torch.empty(0, dtype=dt).element_size()
        if nbytes > max_bytes:
            raise ProtocolError(f"message key {key} of {nbytes} bytes exceeds the limit {max_bytes}")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        chunk = max(int(h[9]), 1)
        works = [self.pg.recv([buf[o:min(o + chunk, nbytes)]], self.peer, 0) for o in range(0, nbytes, chunk)]
        deadline = t0 + (self.timeout_s if timeout_s is None else timeout_s)
        for w in works:
            w.wait(datetime.timedelta(seconds=max(deadline - time.perf_counter(), 0.001)))
        seconds = time.perf_counter() - t0
        return (buf.view(dt).reshape(shp) if numel else torch.empty(shp, dtype=dt)), seconds

    def recv(self, key: int, dtype: torch.dtype | None = None, shape=None, timeout_s: float | None = None, **kw):
        """:meth:`recv_header` + :meth:`recv_payload`: (tensor, seconds)."""
        h, t0 = self.recv_header(timeout_s)
        return self.recv_payload(h, t0, key, dtype, shape, **kw)


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode()) + 1000  # above the fixed message keys


def send_adapter(link: Link, payload: dict, rate_bps: float = 0.0) -> int:
    """Send a :meth:`LoraNode.export` payload (values + AdamW state) as two messages: a manifest (n, 3) int64 of
    [name key, dtype code, numel] and one uint8 blob of the tensors in that order. Returns the bytes sent."""
    items = [(f"{n}/param", t) for n, t in sorted(payload["params"].items())]
    items += [(f"{n}/{k}", payload["opt"][n][k]) for n in sorted(payload["opt"]) for k in ADAM_FIELDS
              if k in payload["opt"][n]]
    manifest = torch.tensor([[_name_key(n), DTYPES.index(t.dtype), t.numel()] for n, t in items],
                            dtype=torch.int64).reshape(-1, 3)
    blob = [t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for _, t in items]
    blob = torch.cat(blob) if blob else torch.empty(0, dtype=torch.uint8)
    return link.send(manifest, K_COUNT) + link.send(blob, K_ADAPTER, rate_bps)


def recv_adapter(link: Link, expected: dict[str, torch.Tensor]) -> tuple[dict, int]:
    """Receive an adapter payload holding exactly the names of ``expected`` (name -> parameter). The manifest is
    checked before the blob is read: another name (e.g. a server-side one), a wrong size or dtype, a repeat,
    a missing parameter or a partial optimiser state raise ProtocolError. Returns (payload, blob bytes)."""
    allowed = {}
    for n, p in expected.items():
        for f_, shp, dt in (("param", p.shape, p.dtype), ("exp_avg", p.shape, p.dtype),
                            ("exp_avg_sq", p.shape, p.dtype), ("step", (), torch.float32)):
            allowed[_name_key(f"{n}/{f_}")] = (n, f_, tuple(shp), dt)
    if len(allowed) != 4 * len(expected):
        raise RuntimeError("adapter name hash collision")

    def check(shp):
        if len(shp) != 2 or shp[1] != 3 or shp[0] > len(allowed):
            raise ProtocolError(f"adapter manifest of shape {shp}: expected (at most {len(allowed)}, 3)")

    manifest, _ = link.recv(K_COUNT, torch.int64, check=check)
    entries, seen, nbytes = [], set(), 0
    for key, code, numel in manifest.tolist():
        if key not in allowed or key in seen:
            raise ProtocolError(f"adapter tensor with key {key} refused: not a device-side name of this cut "
                                "(or sent twice)")
        seen.add(key)
        n, f_, shp, dt = allowed[key]
        size = 1
        for d in shp:
            size *= d
        if not 0 <= code < len(DTYPES) or DTYPES[code] != dt or numel != size:
            raise ProtocolError(f"adapter tensor {n}/{f_}: dtype code {code}, {numel} elements; expected {dt}, "
                                f"shape {shp}")
        entries.append((n, f_, shp, dt, nbytes))
        nbytes += size * torch.empty(0, dtype=dt).element_size()
    if {n for n, f_, *_ in entries if f_ == "param"} != set(expected):
        raise ProtocolError(f"adapter is missing {sorted(set(expected) - {e[0] for e in entries})[:3]}")
    opt_fields: dict[str, set] = {}
    for n, f_, *_ in entries:
        if f_ != "param":
            opt_fields.setdefault(n, set()).add(f_)
    if any(v != set(ADAM_FIELDS) for v in opt_fields.values()):
        raise ProtocolError("adapter optimiser state is incomplete")
    blob, _ = link.recv(K_ADAPTER, torch.uint8, (nbytes,))
    params, opt = {}, {}
    for i, (n, f_, shp, dt, off) in enumerate(entries):
        end = entries[i + 1][4] if i + 1 < len(entries) else nbytes
        t = blob[off:end].view(dt).reshape(shp).clone()
        if f_ == "param":
            params[n] = t
        else:
            opt.setdefault(n, {})[f_] = t
    return {"params": params, "opt": opt}, nbytes


def pair_group(store, m: int, gen: int, rank: int, host: str, timeout_s: float):
    """The size-2 gloo group of device m (generation ``gen``); ``rank`` 0 = server, 1 = device."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(dist.PrefixStore(f"splitlora/pair/{m}/{gen}", store), rank, 2, opts)


def _local_addr(server_addr: str) -> str:
    """This host's address on the route to the server (a UDP connect sends nothing)."""
    if server_addr in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1" if server_addr != "::1" else "::1"
    fam = socket.AF_INET6 if ":" in server_addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect((server_addr, 9))
        return s.getsockname()[0]


def _join_key(m: int) -> str:
    return f"splitlora/join/{m}"


# ============================================================================================ roles
@dataclass
class DistStepLog(StepLog):
    """:class:`StepLog` plus the link: rates (bit/s; the emulated rate, or the model's), measured up-link time of
    the smashed data (server clock) and down-link time of its gradient (device clock), the model's 8 S / R (s)."""

    channel_state: str = ""
    rate_up_bps: float = 0.0
    rate_down_bps: float = 0.0
    t_up_s: float = 0.0
    t_down_s: float = 0.0
    pred_up_s: float = 0.0
    pred_down_s: float = 0.0
    model_smashed_bytes: int = 0
    attempt: int = 0


class _Conn:
    def __init__(self, gen, pg, link, hello, profile):
        self.gen, self.pg, self.link, self.hello, self.profile = gen, pg, link, hello, profile


class Server:
    """Rank 0: owns the adapter between turns, runs CARD, drives the turns, checkpoints."""

    def __init__(self, cfg: RunConfig):
        from peft import get_peft_model

        from .split import num_units, wire_dtype_of

        self.cfg, self.d = cfg, cfg.dist
        base = build_base_model(cfg)
        torch.manual_seed(cfg.train.seed)  # as SplitTrainer: same LoRA initialisation
        model = get_peft_model(copy.deepcopy(base), lora_config(cfg))
        model.train()
        self.node = LoraNode(model, cfg.train)
        self.node.set_owned(list(self.node.params))
        self.L = num_units(model, cfg.train.granularity)
        self.H = int(base.config.hidden_size)
        self.dtype = next(base.parameters()).dtype
        self.wire = wire_dtype_of(cfg.train.wire_dtype)
        self.cm, self.prof = cost_model(cfg, base.config)
        self.states, self.rates = channel_rates(cfg)
        self.turns = [(n, m) for n in range(cfg.rounds) for m in range(cfg.num_devices)]
        self.turn, self.global_step = 0, 0
        self.logs: list[DistStepLog] = []
        self.events: list[dict] = []
        self.conns: dict[int, _Conn] = {}
        self.absent: set[int] = set()
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
                "rng": torch.get_rng_state()}

    def load(self, path: Path) -> None:
        st = torch.load(path, weights_only=True)
        if st.get("version") != CHECKPOINT_VERSION or st.get("fingerprint") != self.cfg.fingerprint():
            raise ValueError(f"checkpoint {path} is invalid: made with another version or configuration")
        self.node.wipe()
        self.node.set_owned(list(st["params"]), {"params": st["params"], "opt": st["opt"]})
        self.turn, self.global_step = int(st["turn"]), int(st["global_step"])
        self.logs = [DistStepLog(**x) for x in st["logs"]]
        self.events = list(st["events"])
        torch.set_rng_state(st["rng"])
        self.event("resumed", path=str(path))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: self.node.params[k].detach().clone() for k in self.node.owned}

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
            hello, _ = link.recv(K_HELLO, torch.int64, (4,))
            profile, _ = link.recv(K_PROFILE, torch.float64, (2,))
        except RuntimeError as err:
            self.event("join_failed", device=m, gen=gen, error=str(err)[:300])
            return None
        idx, fp, last_step, _ = hello.tolist()
        if idx != m or fp != self.cfg.fingerprint():
            self.event("join_refused", device=m, reason=f"device index {idx} / fingerprint {fp} do not match")
            return None
        self.conns[m] = _Conn(gen, pg, link, hello, tuple(profile.tolist()))
        self.absent.discard(m)
        self.event("joined", device=m, gen=gen, device_last_step=last_step)
        return self.conns[m]

    def _drop(self, m: int) -> None:
        c = self.conns.pop(m, None)
        if c is not None:
            try:
                c.pg.abort()
            except Exception:  # noqa: BLE001 - a broken group may refuse to abort; it is dropped anyway
                pass

    # ---------------------------------------------------------------- turns
    def _turn(self, c: _Conn, n: int, m: int, attempt: int) -> None:
        from .split import split_model

        cfg, node, link = self.cfg, self.node, c.link
        t_turn = time.perf_counter()
        state = str(self.states[n, m])
        cut = decide_cut(cfg, self.cm, n, m, c.profile[0], c.profile[1], float(self.rates[n, m]), self.L)
        check_int_range("cut_layer", cut, 0, self.L)
        rate = float(self.rates[n, m]) * cfg.link.rate_scale
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
                              rate_up_bps=rate, rate_down_bps=rate, attempt=attempt,
                              model_smashed_bytes=int(self.prof.smashed_bytes[cut]))
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
                x = hid.to(self.dtype).requires_grad_(bool(d_own))  # as SplitTrainer: no input grad at c = 0
                t1 = time.perf_counter()
                logits = s_part(x, am)
                loss = s_part.loss(logits, labels)
                loss.backward()
                node.opt.step()
                node.opt.zero_grad(set_to_none=True)
                log.server_time_s = time.perf_counter() - t1
                log.loss = float(loss.detach())
                log.smashed_bytes = hid.numel() * hid.element_size()
                log.bytes_up = log.smashed_bytes + labels.numel() * 8 + (0 if am is None else am.numel() * am.element_size())
                log.pred_up_s = 8.0 * log.smashed_bytes / rate
                if d_own:
                    log.bytes_down = link.send(x.grad.to(self.wire), K_GRAD, pace)
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
        import torch.distributed as dist

        fam = socket.AF_INET6 if ":" in self.d.addr else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.d.addr, self.d.port))
        sock.listen(128)
        self.store = dist.TCPStore(self.d.addr, self.d.port, None, True, datetime.timedelta(seconds=self.d.timeout_s),
                                   wait_for_workers=False, master_listen_fd=sock.detach())
        self.event("listening", addr=self.d.addr, port=self.d.port)
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
        return {"steps": self.global_step, "skipped": [e for e in self.events if e["event"] == "skipped"]}

    def write_outputs(self) -> None:
        if not self.d.output_dir:
            return
        out = Path(self.d.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.adapter_state(), out / "adapter.pt")
        (out / "logs.json").write_text(json.dumps([asdict(x) for x in self.logs], indent=1))
        (out / "events.json").write_text(json.dumps(self.events, indent=1, default=str))
        self.node.model.save_pretrained(str(out / "adapter"))


class Device:
    """Rank m + 1: device m. Holds its data; receives its adapter part each turn and hands it back."""

    def __init__(self, cfg: RunConfig, m: int):
        from peft import get_peft_model

        from .split import wire_dtype_of

        check_int_range("device index", m, 0, cfg.num_devices - 1)
        self.cfg, self.d, self.m = cfg, cfg.dist, m
        base = build_base_model(cfg)
        torch.manual_seed(cfg.train.seed)
        model = get_peft_model(copy.deepcopy(base), lora_config(cfg))
        model.train()
        self.node = LoraNode(model, cfg.train)
        self.node.wipe()
        self.wire = wire_dtype_of(cfg.train.wire_dtype)
        self.data = device_batches(cfg, base.config.vocab_size)[m]
        self.profile = device_profile(cfg, m)
        self.last_step, self.turns_done = -1, 0
        self.ckpt = Path(self.d.checkpoint_dir) / f"device{m}.pt" if self.d.checkpoint_dir else None
        if self.ckpt is not None and self.d.resume and self.ckpt.exists():
            st = torch.load(self.ckpt, weights_only=True)
            if st.get("version") != CHECKPOINT_VERSION or st.get("fingerprint") != cfg.fingerprint() or st["device"] != m:
                raise ValueError(f"checkpoint {self.ckpt} is invalid: another version, configuration or device")
            self.last_step, self.turns_done = int(st["last_step"]), int(st["turns_done"])
            torch.set_rng_state(st["rng"])

    def _turn(self, link: Link, ctrl: list[int], rates: list[float]) -> None:
        from .split import split_model, to_wire

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
            b = self.data[(n * I + i) % len(self.data)]
            am = b["attention_mask"] if cfg.train.send_attention_mask else None
            t0, t_down, t_wait = time.perf_counter(), 0.0, 0.0
            h = d_part(b["input_ids"], am)
            if d_part.is_full:
                loss = d_part.loss(h, b["labels"])
                loss.backward()
                link.send(loss.detach().float().reshape(1), K_LOSS)
            else:
                msg = to_wire(h, self.wire, b["labels"], am)
                tw = time.perf_counter()
                link.send(msg.hidden, K_HIDDEN, pace_up)
                link.send(msg.labels, K_LABELS, pace_up)
                if am is not None:
                    link.send(am, K_MASK, pace_up)
                _test_kill(step0 + i)
                if h.requires_grad:
                    g, t_down = link.recv(K_GRAD, self.wire, h.shape)
                    t_wait = time.perf_counter() - tw
                    h.backward(g.to(h.dtype))
                else:
                    t_wait = time.perf_counter() - tw
            node.opt.step()
            node.opt.zero_grad(set_to_none=True)
            stats.append([t_down, time.perf_counter() - t0 - t_wait])
        link.send(torch.tensor(stats, dtype=torch.float64), K_STATS)
        payload = node.export(d_own)
        send_adapter(link, payload, pace_up)
        node.wipe()
        self.last_step, self.turns_done = step0 + I - 1, self.turns_done + 1
        if self.ckpt is not None:
            _atomic_save({"version": CHECKPOINT_VERSION, "fingerprint": self.cfg.fingerprint(), "device": self.m,
                          "last_step": self.last_step, "turns_done": self.turns_done, "last_adapter": payload,
                          "rng": torch.get_rng_state()}, self.ckpt)

    def serve(self) -> int:
        """Join, train the turns the server sends, rejoin after any error. Returns 0 on STOP, 1 if the server
        stays unreachable for ``join_timeout_s`` + ``startup_timeout_s``."""
        import torch.distributed as dist

        host = _local_addr(self.d.addr)
        last_ok = time.monotonic()
        while time.monotonic() - last_ok < self.d.join_timeout_s + self.d.startup_timeout_s:
            pg = None
            try:
                store = dist.TCPStore(self.d.addr, self.d.port, None, False,
                                      datetime.timedelta(seconds=self.d.startup_timeout_s), wait_for_workers=False)
                gen = store.add(_join_key(self.m), 1)
                pg = pair_group(store, self.m, gen, 1, host, self.d.idle_timeout_s)
                link = Link(pg, 0, self.d.timeout_s)
                link.send(torch.tensor([self.m, self.cfg.fingerprint(), self.last_step, gen], dtype=torch.int64), K_HELLO)
                link.send(torch.tensor(self.profile, dtype=torch.float64), K_PROFILE)
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
                if pg is not None:
                    try:
                        pg.abort()
                    except Exception:  # noqa: BLE001
                        pass
                time.sleep(0.2)
        return 1


# ============================================================================================ entry points
def run_role(cfg: RunConfig, rank: int, world_size: int) -> int:
    """Run rank ``rank`` of ``world_size`` = devices + 1 (0: server). Returns the exit code."""
    if world_size != cfg.num_devices + 1:
        raise ValueError(f"WORLD_SIZE={world_size} is invalid: must be {cfg.num_devices + 1} "
                         f"(one server + {cfg.num_devices} devices of the configuration)")
    check_int_range("RANK", rank, 0, world_size - 1)
    if rank == 0:
        Server(cfg).serve()
        return 0
    return Device(cfg, rank - 1).serve()


def _override(cfg: RunConfig, args) -> RunConfig:
    kw = {k: getattr(args, k) for k in ("addr", "port", "checkpoint_dir", "output_dir")
          if getattr(args, k, None) is not None}
    return replace(cfg, dist=replace(cfg.dist, **kw)) if kw else cfg


def launch_local(config_path, *, extra_env: dict | None = None, timeout_s: float = 3600, args=()) -> list[int]:
    """Start the server and every device of ``config_path`` as processes on this host; wait; exit codes."""
    cfg = load_config(config_path)
    world = cfg.num_devices + 1
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "splitlora.distributed", "--config", str(config_path),
                                       *args], env=env))
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML/JSON run configuration (RunConfig fields)")
    p.add_argument("--rank", type=int, help="role: 0 = server, m = device m-1 (default: $RANK)")
    p.add_argument("--world-size", type=int, help="devices + 1 (default: $WORLD_SIZE)")
    p.add_argument("--addr", help="server address to bind/connect (default: config, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="server store port (default: config)")
    p.add_argument("--checkpoint-dir", dest="checkpoint_dir")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--local", action="store_true", help="start every role on this host as subprocesses")


def run_from_args(args) -> int:
    if args.local:
        extra = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("addr", "port", "checkpoint_dir", "output_dir")
                 if getattr(args, k) is not None]
        codes = launch_local(args.config, args=extra)
        print(f"exit codes (server, devices...): {codes}")
        return max(codes)
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "-1"))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "0"))
    if rank < 0 or world < 1:
        raise SystemExit("no role: give --rank/--world-size, set RANK/WORLD_SIZE (torchrun does), or use --local")
    return run_role(_override(load_config(args.config), args), rank, world)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitlora.distributed", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

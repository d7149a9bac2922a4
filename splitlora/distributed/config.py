"""The run configuration: :class:`RunConfig` (with :class:`LinkConfig`, :class:`DistConfig`), its parsing and its
checks. The same file drives the in-process reference and the distributed roles; what they derive from it is the
:class:`~splitlora.distributed.plan.RunPlan`. Source: docs/distributed.md.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from splitlora._validate import check_choice
from splitlora.errors import InvalidParameterError
from splitlora.model.hardware import load_hardware
from splitlora.model.scenario import Scenario
from splitlora.training.federated import MODES
from splitlora.training.models import resolve_source, tiny_llama_config
from splitlora.training.trainer import SplitTrainConfig

#: Training modes of distributed runs: those of the in-process trainer (splitlora.training.federated.MODES).
DIST_MODES = MODES
#: The split parallel modes (SFL-V2, SFL-V1): planned with the parallel schedule's CARD (docs/distributed.md).
SPLITFED_MODES = ("splitfed", "splitfed_v1")
SYNTHETIC_GSM8K = "gsm8k:synthetic"  # RunConfig.data: the offline GSM8K-format default of splitlora.training.data
SHIPPED_GSM8K = "gsm8k"  # RunConfig.data: the shipped copy of GSM8K (splitlora.training.data.load_gsm8k)

# Upper bounds of the run's sizes: far above any run this package is for, low enough that a typo (1e9) is refused
# before a process starts rather than after hours or an out-of-memory kill.
LIMITS = {"batch_size": 4096, "seq_len": 131072, "batches_per_device": 100_000, "rounds": 100_000,
          "steps_per_round": 100_000, "devices": 1024, "timeout_s": 10**7, "rate_scale": 10**6}


# ------------------------------------------------------------------------------- typed value checks
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_int(name: str, v, lo: int, hi: int) -> None:
    """Raise InvalidParameterError unless ``v`` is an int (not a bool, float or string) in [lo, hi]."""
    if not _is_int(v) or not lo <= v <= hi:
        raise InvalidParameterError(f"{name}={v!r} is invalid: must be an integer in [{lo}, {hi}]")


def check_number(name: str, v, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> None:
    """Raise InvalidParameterError unless ``v`` is a finite int or float (not a bool or string) in the interval
    from ``lo`` to ``hi`` (open at a side with ``open_lo`` / ``open_hi``)."""
    ok = _is_number(v) and math.isfinite(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)
    if not ok:
        raise InvalidParameterError(f"{name}={v!r} is invalid: must be a number in {'(' if open_lo else '['}{lo}, "
                                    f"{hi}{')' if open_hi else ']'}")


def check_bool(name: str, v) -> None:
    """Raise InvalidParameterError unless ``v`` is a bool: YAML ``true``/``false`` unquoted, never a string such
    as ``'no'`` (which Python would take as true)."""
    if not isinstance(v, bool):
        raise InvalidParameterError(f"{name}={v!r} is invalid: must be a YAML boolean, true or false (unquoted)")


def check_text(name: str, v, *, optional: bool = False) -> None:
    """Raise InvalidParameterError unless ``v`` is a non-empty string (or None with ``optional``)."""
    if v is None and optional:
        return
    if not isinstance(v, str) or not v.strip():
        raise InvalidParameterError(f"{name}={v!r} is invalid: must be a non-empty string"
                                    f"{' or null' if optional else ''}")


@dataclass(frozen=True)
class LinkConfig:
    """Channel states and their emulation.

    condition: "Good", "Normal", "Poor" (fixed) or "Markov" (per-device chains of data/channel.yaml) ["Normal"].
    seed: seed of the Markov chains [0]. emulate: pace every payload to the state's rate (rate limiter) [False].
    rate_scale: multiplies the channel model's rate for the emulation and the logged prediction (< 1 slows the
    link so transfers are measurable on a small model); CARD always sees the unscaled rate [1.0].
    rate_source: the up-link rate CARD is given for a device's turn: "model" (the channel state's rate of this
    round) or "measured" (the server's estimate from that device's previous turn: bits of smashed data over
    their measured transfer time, divided by ``rate_scale``; the model's rate until a first measurement) ["model"].
    """
    condition: str = "Normal"
    seed: int = 0
    emulate: bool = False
    rate_scale: float = 1.0
    rate_source: str = "model"

    def __post_init__(self):
        check_choice("link.condition", self.condition, ("Good", "Normal", "Poor", "Markov"))
        check_int("link.seed", self.seed, 0, 2**63 - 1)
        check_bool("link.emulate", self.emulate)
        check_number("link.rate_scale", self.rate_scale, 0, LIMITS["rate_scale"], open_lo=True)
        check_choice("link.rate_source", self.rate_source, ("model", "measured"))


@dataclass(frozen=True)
class DistConfig:
    """Where and how the roles talk (not part of the training fingerprint).

    addr: address the server binds and devices connect to; loopback unless you name one ["127.0.0.1"].
    port: TCP port the server listens on for devices (not torchrun's rendezvous port) [29500].
    timeout_s: longest wait for one message inside a turn (s) [60]. join_timeout_s: how long the server waits
    for a failed device to rejoin before skipping it (s); must exceed ``timeout_s`` [90]. startup_timeout_s:
    wait for a device's first join (s) [300]. idle_timeout_s: a device's wait for its next turn (s) [3600]. retries: attempts after a failed
    turn [1]. checkpoint_dir: folder of ``server.pt`` (+ ``server.logs.jsonl``, ``server.events.jsonl``) /
    ``device<m>.pt``; None = ``<output_dir>/checkpoint`` [None]. resume: load an existing checkpoint at start
    [True]. output_dir: where the server writes ``adapter.pt``, ``logs.json``, ``events.json`` and the PEFT
    ``adapter/`` folder; None = the run folder ``splitlora-runs/<fingerprint>`` [None].
    device: where each rank computes: "cpu", "cuda" (``cuda:$LOCAL_RANK``, modulo the visible GPUs) or "auto"
    (CUDA when this host has it) ["auto"]; read by every rank on its own host (:func:`compute_device`).
    backend: payload transport between the server and a device: "gloo" (from CPU memory), "nccl" (GPU to GPU;
    both ends must compute on CUDA with an NCCL build of torch, else the device is refused) or "auto" (NCCL
    where both ends can, gloo otherwise) ["auto"]. Headers and control messages always use the pair's TCP
    connection (:func:`splitlora.distributed.wire.choose_transport`).
    checkpoints: write checkpoints (to ``checkpoint_dir``) [True].
    secret_file: file holding the run's shared secret; None = the environment variable ``SPLITLORA_SECRET``
    (:func:`splitlora.distributed.wire.load_secret`; ``--local`` generates one) [None].
    """
    addr: str = "127.0.0.1"
    port: int = 29500
    timeout_s: float = 60.0
    join_timeout_s: float = 90.0
    startup_timeout_s: float = 300.0
    idle_timeout_s: float = 3600.0
    retries: int = 1
    checkpoint_dir: str | None = None
    resume: bool = True
    output_dir: str | None = None
    device: str = "auto"
    backend: str = "auto"
    # -- protocol and results (issue 11): checkpoints on by default, the shared secret
    checkpoints: bool = True
    secret_file: str | None = None

    def __post_init__(self):
        check_text("dist.addr", self.addr)
        check_int("dist.port", self.port, 1, 65535)
        check_choice("dist.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("dist.backend", self.backend, ("auto", "gloo", "nccl"))
        for k in ("timeout_s", "join_timeout_s", "startup_timeout_s", "idle_timeout_s"):
            check_number(f"dist.{k}", getattr(self, k), 0, LIMITS["timeout_s"], open_lo=True)
        check_int("dist.retries", self.retries, 0, 1000)
        check_bool("dist.resume", self.resume)
        check_text("dist.checkpoint_dir", self.checkpoint_dir, optional=True)
        check_text("dist.output_dir", self.output_dir, optional=True)
        _check_protocol(self)


# -- protocol and results (issue 11) -------------------------------------------------------------------------
def _check_protocol(d: DistConfig) -> None:
    """The checks of the fields the protocol needs: a device whose pair the server closed may notice only at its
    own ``timeout_s``, so the server must wait longer for it to rejoin; ``checkpoints`` a YAML boolean; the
    secret file a path string."""
    if not d.join_timeout_s > d.timeout_s:
        raise InvalidParameterError(
            f"dist.join_timeout_s={d.join_timeout_s!r} is invalid with dist.timeout_s={d.timeout_s!r}: must be "
            "greater, so that a device noticing a dropped pair only at its own timeout can still rejoin")
    check_bool("dist.checkpoints", d.checkpoints)
    check_text("dist.secret_file", d.secret_file, optional=True)


@dataclass(frozen=True)
class RunConfig:
    """One split-training run; the same file drives :func:`run_in_process` and the distributed roles.

    model: ``tiny_llama_config`` keyword arguments plus ``seed``, or ``{"name_or_path": ..., "seed": ...}``.
    lora: ``peft.LoraConfig`` keyword arguments. train: :class:`SplitTrainConfig` fields.
    batch_size, seq_len: B sequences of s tokens per mini-batch. batches_per_device: mini-batches each device
    holds. data: where they come from (:func:`device_batches`): None = random tokens seeded by ``data_seed`` and
    the device index, the second half of every second row padding (the fast default); ``"gsm8k:synthetic"``
    (:data:`SYNTHETIC_GSM8K`) = the package's offline GSM8K-format word problems (:func:`splitlora.training.data.load_gsm8k`
    with ``seed=data_seed``); else a GSM8K-format ``.jsonl`` file or a folder with ``train.jsonl`` (the same
    string on every host: it is part of the fingerprint) [None]. devices: device profile keys or boards of
    data/hardware.yaml (and of ``hardware``), one per device rank (their reported profile).
    rounds, steps_per_round: N rounds, I mini-batches per device per round. cut: "card" (CARD each round),
    an int (fixed) or a list per round of a cut per device. w: CARD's delay weight, the one place it is set (also
    for ``card_scenario``). card_scenario: None (CARD costs the trained model and workload) or
    :class:`~splitlora.model.scenario.Scenario` fields other than w, server, hardware: CARD then decides for that
    scenario's model (e.g. Llama-3.2-1B, L' units) and the trained model gets the cut round(c' L / L'), so a small
    model can stand in for the paper's. hardware: the user's hardware YAML merged over data/hardware.yaml (docs/model.md
    "Your own hardware") [None]. server: server profile key or board CARD plans for [None: the default server].
    link: :class:`LinkConfig`. dist: :class:`DistConfig`. mode: the training mode (:data:`DIST_MODES`,
    docs/distributed.md "Training modes"): "sequential" (devices take turns), "splitfed" (SFL-V2: the devices of
    a round in parallel, one server-side adapter, FedAvg of the device-side adapters), "splitfed_v1" (SFL-V1: as
    splitfed with a server-side copy per device, averaged too) or "fedlora" (no split, FedAvg of whole adapters)
    ["sequential"].
    """
    model: dict = field(default_factory=lambda: {"hidden_size": 32, "num_layers": 2, "seed": 0})
    lora: dict = field(default_factory=lambda: {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                "target_modules": ["q_proj", "v_proj"]})
    train: SplitTrainConfig = SplitTrainConfig()
    batch_size: int = 2
    seq_len: int = 16
    batches_per_device: int = 4
    data_seed: int = 0
    data: str | None = None
    devices: tuple = ("Device 3",)
    rounds: int = 2
    steps_per_round: int = 2
    cut: object = "card"
    w: float = 0.1
    card_scenario: dict | None = None
    link: LinkConfig = LinkConfig()
    dist: DistConfig = DistConfig()
    hardware: str | None = None
    server: str | None = None
    mode: str = "sequential"

    def __post_init__(self):
        for k in ("batch_size", "seq_len", "batches_per_device", "rounds", "steps_per_round"):
            check_int(k, getattr(self, k), 1, LIMITS[k])
        check_int("data_seed", self.data_seed, 0, 2**63 - 1)
        for k in ("model", "lora"):
            if not isinstance(getattr(self, k), dict):
                raise InvalidParameterError(f"{k}={getattr(self, k)!r} is invalid: must be a mapping")
        if self.card_scenario is not None and not isinstance(self.card_scenario, dict):
            raise InvalidParameterError(f"card_scenario={self.card_scenario!r} is invalid: must be a mapping or null")
        for k, t in (("train", SplitTrainConfig), ("link", LinkConfig), ("dist", DistConfig)):
            if not isinstance(getattr(self, k), t):
                raise InvalidParameterError(f"{k}={getattr(self, k)!r} is invalid: must be a mapping of "
                                            f"{t.__name__} fields")
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise InvalidParameterError(f"data={self.data!r} is invalid: must be None, {SYNTHETIC_GSM8K!r} or a GSM8K-format "
                             "JSONL path")
        if not isinstance(self.devices, (list, tuple)) or not all(isinstance(d, str) for d in self.devices):
            raise InvalidParameterError(f"devices={self.devices!r} is invalid: must be a list of device names of "
                                        "data/hardware.yaml, one per device rank, e.g. ['Device 1']")
        object.__setattr__(self, "devices", tuple(self.devices))
        if not 1 <= len(self.devices) <= LIMITS["devices"]:
            raise InvalidParameterError(f"devices={list(self.devices)!r} is invalid: must name 1 to "
                                        f"{LIMITS['devices']} devices")
        check_number("w", self.w, 0.0, 1.0)
        check_choice("mode", self.mode, DIST_MODES)
        if self.mode in SPLITFED_MODES and self.cut == "card" and self.w <= 0:
            raise InvalidParameterError(f"w={self.w!r} is invalid with mode={self.mode!r} and cut='card': must be in "
                                        "(0, 1] (the parallel schedule's CARD has no optimum at w = 0)")
        check_text("hardware", self.hardware, optional=True)
        check_text("server", self.server, optional=True)
        if self.card_scenario is not None:
            for k in sorted(set(self.card_scenario) & {"w", "hardware", "server"}):
                raise InvalidParameterError(
                    f"card_scenario.{k}={self.card_scenario[k]!r} is invalid: {k} is set once, at the top level of "
                    f"the run configuration ({k}: ...), and CARD uses it with card_scenario too")
        if isinstance(self.cut, str):
            check_choice("cut", self.cut, ("card",))
        elif isinstance(self.cut, (list, tuple)):
            if len(self.cut) != self.rounds or any(not isinstance(r, (list, tuple)) or len(r) != len(self.devices)
                                                   for r in self.cut):
                raise InvalidParameterError(f"cut={self.cut!r} is invalid: must be {self.rounds} rounds x {len(self.devices)} cuts")
            for r in self.cut:
                for c in r:
                    check_int("cut", c, 0, 10**6)
        else:
            check_int("cut", self.cut, 0, 10**6)

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
        if d["data"] is None:
            d.pop("data")  # fingerprints of random-token runs are those from before the field existed
        d["train"].pop("progress")
        if d["link"]["rate_source"] == "model":
            d["link"].pop("rate_source")  # as for ``data``: fingerprints from before the field existed hold
        for k in ("hardware", "server"):
            if d[k] is None:
                d.pop(k)
        if self.hardware is not None and Path(self.hardware).is_file():  # its contents, not only its path
            d["hardware_sha256"] = hashlib.sha256(Path(self.hardware).read_bytes()).hexdigest()
        if d["mode"] == "sequential":
            d.pop("mode")  # as for ``data``: fingerprints from before the field existed hold
        digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def section_keys(section: str) -> list[str] | None:
    """Keys the nested section ``section`` of a run configuration may hold (sorted): the parameters of
    :class:`SplitTrainConfig` (``train``), :class:`LinkConfig`, :class:`DistConfig`, ``peft.LoraConfig`` (``lora``),
    :class:`~splitlora.model.scenario.Scenario` (``card_scenario``), ``tiny_llama_config`` plus ``seed`` and
    ``name_or_path`` (``model``); None for a field that is not a section."""
    def lora():
        from peft import LoraConfig
        return LoraConfig

    def scenario():
        return Scenario

    def tiny():
        return tiny_llama_config

    targets = {"train": lambda: SplitTrainConfig, "link": lambda: LinkConfig, "dist": lambda: DistConfig,
               "lora": lora, "card_scenario": scenario, "model": tiny}
    if section not in targets:
        return None
    keys = [n for n, p in inspect.signature(targets[section]()).parameters.items() if p.kind != p.VAR_KEYWORD]
    return sorted(keys + (["name_or_path", "seed"] if section == "model" else []))


def _check_keys(section: str, given) -> None:
    """Raise ValueError unless ``given`` is a mapping whose keys are all in :func:`section_keys` of ``section``."""
    if not isinstance(given, dict):
        raise InvalidParameterError(f"{section}={given!r} is invalid: must be a mapping")
    allowed = section_keys(section)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InvalidParameterError(f"{section}.{unknown[0]} is invalid: not a field of {section}; must be among {allowed}")


def config_from_dict(d: dict) -> RunConfig:
    """Build a :class:`RunConfig` from a plain dict (YAML/JSON).

    Raises InvalidParameterError (a ValueError) naming the field, its value and what is allowed, for an unknown
    key (top level, ``train``, ``link``, ``dist``), a value of the wrong type (a string for a number or a boolean,
    a float for an integer) or out of range. What needs the model or the files (device names, ``model``,
    ``lora``, ``card_scenario``, the cut range, ``data``) is checked by :func:`check_run_config`."""
    if not isinstance(d, dict):
        raise InvalidParameterError(f"configuration={d!r} is invalid: must be a mapping of RunConfig fields")
    d = dict(d)
    known = {f.name for f in fields(RunConfig)}
    unknown = set(d) - known
    if unknown:
        raise InvalidParameterError(f"config keys {sorted(unknown)} are invalid: must be among {sorted(known)}")
    if "train" in d:
        _check_keys("train", d["train"])
        t = dict(d["train"])
        if "betas" in t and isinstance(t["betas"], list):
            t["betas"] = tuple(t["betas"])
        try:
            d["train"] = SplitTrainConfig(**t)
        except InvalidParameterError as err:  # SplitTrainConfig names its own fields: say which section
            raise InvalidParameterError(f"train.{err}") from None
    if "link" in d:
        _check_keys("link", d["link"])
        d["link"] = LinkConfig(**d["link"])
    if "dist" in d:
        _check_keys("dist", d["dist"])
        d["dist"] = DistConfig(**d["dist"])
    return RunConfig(**d)


def model_units(cfg: RunConfig) -> tuple[int, int] | None:
    """``(L, max_position_embeddings)`` of the configuration's model without loading weights: L the number of cut
    points (blocks, or 2 x blocks for ``train.granularity: sublayer``). From ``tiny_llama_config`` for the offline
    model, ``data/models/<name>.json`` for a named model, ``config.json`` of a local folder; None when unknown (a
    Hub id, a GGUF file)."""
    from splitlora.paths import DATA_DIR
    from splitlora.training.models import NAMED_MODELS

    name = cfg.model.get("name_or_path")
    if name is None:
        mc = tiny_llama_config(**{k: v for k, v in cfg.model.items() if k != "seed"})
        blocks, max_pos = mc.num_hidden_layers, mc.max_position_embeddings
    else:
        path = (DATA_DIR / "models" / f"{NAMED_MODELS[name.lower()]['config']}.json" if name.lower() in NAMED_MODELS
                else Path(name).expanduser() / "config.json")
        try:
            raw = json.loads(path.read_text())
            blocks, max_pos = int(raw["num_hidden_layers"]), int(raw.get("max_position_embeddings") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return (blocks if cfg.train.granularity == "block" else 2 * blocks), max_pos


def _check_model_section(model: dict) -> None:
    _check_keys("model", model)
    if "seed" in model:
        check_int("model.seed", model["seed"], 0, 2**63 - 1)
    if "name_or_path" not in model:
        for k, v in model.items():
            if k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings") and not (k == "intermediate_size" and v is None):
                check_int(f"model.{k}", v, 1, 10**7)
            elif k == "tie_word_embeddings":
                check_bool(f"model.{k}", v)
        tiny_llama_config(**{k: v for k, v in model.items() if k != "seed"})
        return
    check_text("model.name_or_path", model["name_or_path"])
    extra = sorted(set(model) - {"name_or_path", "seed"})
    if extra:
        raise InvalidParameterError(f"model.{extra[0]}={model[extra[0]]!r} is invalid with model.name_or_path: must be "
                                    "absent (only seed goes with a named or local model)")
    try:
        resolve_source(model["name_or_path"])  # a named model's package installed, a local path present
    except OSError as err:
        raise InvalidParameterError(f"model.{err}") from None


def _check_lora_section(lora: dict) -> None:
    _check_keys("lora", lora)
    if "r" in lora:
        check_int("lora.r", lora["r"], 1, 4096)
    if "lora_alpha" in lora:
        check_number("lora.lora_alpha", lora["lora_alpha"], 0, 1e6, open_lo=True)
    if "lora_dropout" in lora:
        check_number("lora.lora_dropout", lora["lora_dropout"], 0.0, 1.0, open_hi=True)
    tm = lora.get("target_modules")
    if tm is not None and not (isinstance(tm, str) and tm.strip()) and not (
            isinstance(tm, list) and tm and all(isinstance(x, str) and x.strip() for x in tm)):
        raise InvalidParameterError(f"lora.target_modules={tm!r} is invalid: must be a module name or a non-empty list "
                                    "of module names, e.g. [q_proj, v_proj]")
    for k in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "lora_bias"):
        if k in lora:
            check_bool(f"lora.{k}", lora[k])
    from peft import LoraConfig

    from splitlora.training.trainer import _check_lora_config

    try:
        lc = LoraConfig(**lora)
    except (TypeError, ValueError) as err:
        raise InvalidParameterError(f"lora={lora!r} is invalid: peft.LoraConfig refuses it: {err}") from None
    _check_lora_config(lc)


def _check_data(cfg: RunConfig) -> None:
    """``data`` exists and holds the M x K x B records the devices take (each line checked: JSON, UTF-8, length)."""
    from splitlora.paths import GSM8K_DIR
    from splitlora.training.data import validate_jsonl

    data = cfg.data
    if data is None or data == SYNTHETIC_GSM8K:
        return
    p = Path(data).expanduser()
    if data == SHIPPED_GSM8K and not p.exists():
        p = GSM8K_DIR
    f = p / "train.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise InvalidParameterError(f"data={data!r} is invalid: must be {SYNTHETIC_GSM8K!r}, {SHIPPED_GSM8K!r}, an "
                                    "existing GSM8K-format .jsonl file or a folder holding train.jsonl (no such file)")
    need = cfg.num_devices * cfg.batches_per_device * cfg.batch_size
    n = validate_jsonl(f)
    if n < need:
        raise InvalidParameterError(f"data={data!r} is invalid: holds {n} records, must hold {need} (devices x "
                                    "batches_per_device x batch_size)")


def check_run_config(cfg: RunConfig) -> None:
    """Check, without loading model weights, what the roles would otherwise find only after they start: every
    device name in data/hardware.yaml, the ``model`` keyword arguments of the offline tiny Llama (or a named or
    local model that exists), the ``lora`` fields and ranges (and peft options split training can export), the
    ``card_scenario`` fields and values, the ``data`` file, and the cut layers and ``seq_len`` against the model
    (cut in [0, L], seq_len <= max_position_embeddings). Raises InvalidParameterError naming the field."""
    hw = load_hardware(cfg.hardware)
    for name in cfg.devices:
        hw.device(hw.device_key(name, "devices")).sustained_flops_per_s("fp32")  # the profile a device reports
    hw.server(cfg.server)
    _check_model_section(cfg.model)
    _check_lora_section(cfg.lora)
    if cfg.card_scenario is not None:
        _check_keys("card_scenario", cfg.card_scenario)
        for f in fields(Scenario):
            if isinstance(f.default, bool) and f.name in cfg.card_scenario:
                check_bool(f"card_scenario.{f.name}", cfg.card_scenario[f.name])
        try:
            planning_scenario(cfg)
        except InvalidParameterError as err:
            raise InvalidParameterError(f"card_scenario.{err}") from None
    _check_data(cfg)
    units = model_units(cfg)
    if units is not None:
        L, max_pos = units
        cuts = ([] if isinstance(cfg.cut, str) else [cfg.cut] if _is_int(cfg.cut)
                else [c for r in cfg.cut for c in r])
        for c in cuts:
            if not 0 <= c <= L:
                raise InvalidParameterError(f"cut={cfg.cut!r} is invalid: must be cut layers in [0, {L}] (L = {L} "
                                            f"{cfg.train.granularity} units of this model) (offending value {c})")
        if max_pos and cfg.seq_len > max_pos:
            raise InvalidParameterError(f"seq_len={cfg.seq_len!r} is invalid: must be <= {max_pos} "
                                        "(the model's max_position_embeddings)")


def planning_scenario(cfg: RunConfig) -> Scenario:
    """The :class:`~splitlora.model.scenario.Scenario` CARD plans with when ``card_scenario`` is set: its fields and
    the run's ``w``, ``hardware`` and ``server``."""
    return Scenario(**cfg.card_scenario, w=cfg.w, hardware=cfg.hardware, server=cfg.server)


def merge_overrides(base: dict, overrides: dict, where: str = "overrides") -> dict:
    """``base`` (a run configuration's fields) with ``overrides`` merged in: nested dicts merged key by key, anything
    else replaced. Raises InvalidParameterError for a key that is not a RunConfig field or section field."""
    if not isinstance(overrides, dict):
        raise InvalidParameterError(f"{where}={overrides!r} is invalid: must be a mapping of RunConfig fields")
    out = dict(base)
    top = {f.name for f in fields(RunConfig)}
    for k, v in overrides.items():
        if k not in top:
            raise InvalidParameterError(f"{where}[{k!r}] is invalid: {k!r} is not a RunConfig field; must be among {sorted(top)}")
        if isinstance(v, dict):
            allowed = section_keys(k)
            unknown = sorted(set(v) - set(allowed)) if allowed is not None else []
            if unknown:
                raise InvalidParameterError(f"{where}[{k!r}][{unknown[0]!r}] is invalid: {unknown[0]!r} is not a field of "
                                            f"{k!r}; must be among {allowed}")
            old = out.get(k)
            out[k] = {**old, **v} if isinstance(old, dict) else dict(v)
        else:
            out[k] = v
    return out


def parse_set(items) -> dict:
    """Overrides from ``--set`` items ``key=value`` or ``section.key=value`` (value parsed as YAML: ``rounds=2``,
    ``dist.timeout_s=5``, ``devices=[Device 1]``), as a nested dict for :func:`merge_overrides`.
    Raises InvalidParameterError for an item without ``=`` or a value that is not YAML."""
    out: dict = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts) or len(parts) > 2:
            raise InvalidParameterError(f"--set {item!r} is invalid: must be key=value or section.key=value, e.g. "
                                        "rounds=2 or dist.timeout_s=5")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise InvalidParameterError(f"--set {item!r} is invalid: the value is not YAML") from None
        if len(parts) == 2:
            section = out.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise InvalidParameterError(f"--set {item!r} is invalid: {parts[0]} was set as a whole already")
            section[parts[1]] = value
        else:
            out[parts[0]] = value
    return out


def load_config(path, check: bool = False, overrides: dict | None = None) -> RunConfig:
    """Read a run configuration from a YAML or JSON file, with ``overrides`` merged in (:func:`merge_overrides`,
    e.g. from :func:`parse_set`); ``check``: also :func:`check_run_config`.
    Raises InvalidParameterError for an invalid configuration (naming the field) or an empty file or one that is
    not a mapping; OSError for an unreadable file."""
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        msg = " ".join(str(err).split())
        raise InvalidParameterError(f"config={str(path)!r} is invalid: not YAML/JSON ({msg})") from None
    if raw is None:
        raise InvalidParameterError(f"config={str(path)!r} is invalid: the file is empty; must hold RunConfig fields "
                                    "(see data/runs/distributed.yaml)")
    cfg = config_from_dict(merge_overrides(raw, overrides, "--set") if overrides else raw)
    if check:
        check_run_config(cfg)
    return cfg

"""The run configuration: :class:`RunConfig` (with :class:`LinkConfig`, :class:`DistConfig`), its parsing and its
checks. The same file drives the in-process reference and the distributed roles; what they derive from it is the
:class:`~splitlora.distributed.plan.RunPlan`. Source: docs/distributed.md.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from splitlora._validate import check_choice, check_int_range, check_positive
from splitlora.errors import InvalidParameterError
from splitlora.model.hardware import load_device
from splitlora.model.scenario import Scenario
from splitlora.training.models import resolve_source, tiny_llama_config
from splitlora.training.trainer import SplitTrainConfig

SYNTHETIC_GSM8K = "gsm8k:synthetic"  # RunConfig.data: the offline GSM8K-format default of splitlora.training.data


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
        check_positive("link.rate_scale", self.rate_scale)
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
        check_int_range("dist.port", self.port, 1, 65535)
        check_choice("dist.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("dist.backend", self.backend, ("auto", "gloo", "nccl"))
        for k in ("timeout_s", "join_timeout_s", "startup_timeout_s", "idle_timeout_s"):
            check_positive(f"dist.{k}", getattr(self, k))
        check_int_range("dist.retries", self.retries, 0, 1000)
        _check_protocol(self)


# -- protocol and results (issue 11) -------------------------------------------------------------------------
def _check_protocol(d: DistConfig) -> None:
    """The checks of the fields the protocol needs: a device whose pair the server closed may notice only at its
    own ``timeout_s``, so the server must wait longer for it to rejoin; ``checkpoints`` a YAML boolean; the
    folders and the secret file strings."""
    if not d.join_timeout_s > d.timeout_s:
        raise InvalidParameterError(
            f"dist.join_timeout_s={d.join_timeout_s!r} is invalid with dist.timeout_s={d.timeout_s!r}: must be "
            "greater, so that a device noticing a dropped pair only at its own timeout can still rejoin")
    if not isinstance(d.checkpoints, bool):
        raise InvalidParameterError(f"dist.checkpoints={d.checkpoints!r} is invalid: must be true or false")
    for k in ("secret_file", "checkpoint_dir", "output_dir"):
        v = getattr(d, k)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise InvalidParameterError(f"dist.{k}={v!r} is invalid: must be a non-empty path string or null")


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
    string on every host: it is part of the fingerprint) [None]. devices: device names of data/hardware.yaml, one per device rank (their reported profile).
    rounds, steps_per_round: N rounds, I mini-batches per device per round. cut: "card" (CARD each round),
    an int (fixed) or a list per round of a cut per device. w: CARD's delay weight. card_scenario: None (CARD
    costs the trained model and workload) or :class:`~splitlora.model.scenario.Scenario` fields: CARD then decides
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
    data: str | None = None
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
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise InvalidParameterError(f"data={self.data!r} is invalid: must be None, {SYNTHETIC_GSM8K!r} or a GSM8K-format "
                             "JSONL path")
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise InvalidParameterError("devices=() is invalid: must name at least one device")
        if isinstance(self.cut, str):
            check_choice("cut", self.cut, ("card",))
        elif isinstance(self.cut, (list, tuple)):
            if len(self.cut) != self.rounds or any(len(r) != len(self.devices) for r in self.cut):
                raise InvalidParameterError(f"cut={self.cut!r} is invalid: must be {self.rounds} rounds x {len(self.devices)} cuts")
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
        if d["data"] is None:
            d.pop("data")  # fingerprints of random-token runs are those from before the field existed
        d["train"].pop("progress")
        if d["link"]["rate_source"] == "model":
            d["link"].pop("rate_source")  # as for ``data``: fingerprints from before the field existed hold
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

    Raises ValueError naming the field for an unknown key (top level, ``train``, ``link``, ``dist``) or a value
    the dataclasses refuse. The rest (device names, ``model``, ``lora``, ``card_scenario``) is checked by
    :func:`check_run_config`."""
    d = dict(d)
    known = {f.name for f in fields(RunConfig)}
    unknown = set(d) - known
    if unknown:
        raise InvalidParameterError(f"config keys {sorted(unknown)} are invalid: must be among {sorted(known)}")
    if "train" in d:
        _check_keys("train", d["train"])
        t = dict(d["train"])
        if "betas" in t:
            t["betas"] = tuple(t["betas"])
        d["train"] = SplitTrainConfig(**t)
    if "link" in d:
        _check_keys("link", d["link"])
        d["link"] = LinkConfig(**d["link"])
    if "dist" in d:
        _check_keys("dist", d["dist"])
        d["dist"] = DistConfig(**d["dist"])
    return RunConfig(**d)


def check_run_config(cfg: RunConfig) -> None:
    """Check, without loading model weights, what the roles would otherwise find only after they start: every
    device name in data/hardware.yaml, the ``model`` keyword arguments of the offline tiny Llama, the ``lora``
    fields of ``peft.LoraConfig`` and the ``card_scenario`` fields and values. Raises ValueError naming the field.
    """
    for name in cfg.devices:
        load_device(name)
    _check_keys("model", cfg.model)
    if "name_or_path" not in cfg.model:
        tiny_llama_config(**{k: v for k, v in cfg.model.items() if k != "seed"})
    else:
        resolve_source(cfg.model["name_or_path"])  # a named model's package installed, a local path present
    _check_keys("lora", cfg.lora)
    if cfg.card_scenario is not None:
        _check_keys("card_scenario", cfg.card_scenario)
        Scenario(**cfg.card_scenario)


def load_config(path, check: bool = False) -> RunConfig:
    """Read a run configuration from a YAML or JSON file; ``check``: also :func:`check_run_config`.
    Raises ValueError for an invalid configuration (naming the field), OSError for an unreadable file."""
    cfg = config_from_dict(yaml.safe_load(Path(path).read_text()) or {})
    if check:
        check_run_config(cfg)
    return cfg

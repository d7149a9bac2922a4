"""One run configuration, run both ways and tabulated: distributed (processes on this host) and in-process.

A :class:`~splitlora.distributed.config.RunConfig` file (``data/runs/*.yaml`` or any path) drives both
``splitlora train-distributed --config X.yaml --local`` / torchrun and
:func:`~splitlora.distributed.plan.run_in_process`; this module runs the same file both ways from Python (a
notebook, a test) and puts the two side by side, one row per mini-batch (:func:`compare_with_in_process`,
:func:`transfer_accuracy`). Source: docs/distributed.md, "One configuration file".
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from splitlora._validate import check_positive
from splitlora.distributed.config import check_run_config, config_from_dict, merge_overrides
from splitlora.distributed.launch import free_port, launch_local
from splitlora.distributed.plan import run_in_process
from splitlora.errors import InvalidParameterError
from splitlora.model.hardware import CHANNEL_STATES
from splitlora.paths import RUNS_DIR

#: Columns of :func:`compare_with_in_process`, in order.
TABLE_COLUMNS = ("step", "round", "device", "device_name", "channel_state", "cut_layer", "loss_distributed",
                 "loss_in_process", "loss_abs_diff", "smashed_bytes", "model_smashed_bytes", "rate_up_bps",
                 "t_up_s", "pred_up_s", "t_up_over_pred")
#: ``dist`` fields :func:`run_distributed_local` always sets itself (a free port, ``<workdir>/out``).
RESERVED_DIST_KEYS = ("port", "output_dir")
#: Environment of every process :func:`run_distributed_local` starts: one torch thread each (the server and
#: the devices share this host's cores), no Python warnings in their logs.
PROCESS_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def available_run_configs() -> list[str]:
    """Names (file names) of the shipped run configurations in ``data/runs/``, sorted."""
    return sorted(p.name for p in RUNS_DIR.glob("*") if p.suffix in (".yaml", ".yml", ".json"))


def resolve_run_config(config) -> Path:
    """The run configuration file ``config`` names.

    Args:
        config: a path (str or Path) to an existing YAML/JSON file, or a bare name of a shipped configuration in
            ``data/runs/`` (:data:`splitlora.paths.RUNS_DIR`), with or without its suffix: ``"distributed"``,
            ``"distributed.yaml"``.
    Returns:
        The file's absolute Path.
    Raises:
        ValueError: ``config`` is neither an existing file nor a shipped name; the message lists the shipped ones.
    """
    if isinstance(config, (str, os.PathLike)) and str(config).strip():
        p = Path(config).expanduser()
        if p.is_file():
            return p.resolve()
        if p.name == str(config):  # a bare name: look in data/runs/
            for cand in (RUNS_DIR / p.name, *(RUNS_DIR / f"{p.name}{s}" for s in (".yaml", ".yml", ".json"))):
                if cand.is_file():
                    return cand.resolve()
    raise InvalidParameterError(f"config={config!r} is invalid: must be an existing YAML/JSON file or one of "
                     f"{available_run_configs()} (in {RUNS_DIR})")


def run_config_dict(config, overrides: dict | None = None) -> dict:
    """The fields of run configuration ``config`` with ``overrides`` merged in, checked by building the RunConfig.

    Args:
        config: a path or a shipped name (:func:`resolve_run_config`).
        overrides: RunConfig fields to change; a dict value is merged into the file's dict key by key (e.g.
            ``{"rounds": 1, "link": {"rate_scale": 0.5}}`` keeps the other ``link`` fields), anything else
            replaces the file's value. None or {}: the file as it is.
    Returns:
        A plain dict (YAML/JSON-serialisable) for :func:`splitlora.distributed.config.config_from_dict`.
    Raises:
        ValueError: unknown config (:func:`resolve_run_config`); an override key that is not a RunConfig field
            (or not a field of ``train``, ``link``, ``dist``, ``card_scenario``, ``lora``, ``model``), naming the
            key; ``overrides`` not a dict; any value the RunConfig refuses.
    """

    path = resolve_run_config(config)
    base = yaml.safe_load(path.read_text()) or {}
    if not isinstance(base, dict):
        raise InvalidParameterError(f"config={str(path)!r} is invalid: must hold a mapping of RunConfig fields")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise InvalidParameterError(f"overrides={overrides!r} is invalid: must be a dict of RunConfig fields")
    merged = merge_overrides(base, overrides)
    check_run_config(config_from_dict(merged))  # raises ValueError naming the field
    return merged


def run_distributed_local(config, overrides: dict | None = None, workdir=None, timeout_s: float = 300.0):
    """Run ``config`` as a distributed job on this host: the server and every device as processes on 127.0.0.1.

    The merged configuration (:func:`run_config_dict`) gets a free ``dist.port`` and ``dist.output_dir =
    <workdir>/out``, is written to ``<workdir>/run.yaml`` and run with :func:`splitlora.distributed.launch.launch_local`
    (environment :data:`PROCESS_ENV`). The processes' output goes to ``<workdir>/processes.log``.

    Args:
        config: a path or a shipped name (:func:`resolve_run_config`); overrides: see :func:`run_config_dict`
            (``dist.port`` and ``dist.output_dir`` are set here and may not be overridden).
        workdir: folder for the configuration, the outputs (``out/``: ``logs.json``, ``events.json``,
            ``adapter.pt``, ``adapter/``) and the log; None: a temporary folder, removed before returning.
        timeout_s: the longest the whole run may take (s), > 0; then every process is killed.
    Returns:
        ``(logs, events)``: ``logs`` a DataFrame with one row per mini-batch trained, in order (the server's
        ``logs.json``: the fields of :class:`splitlora.distributed.roles.DistStepLog`; bytes in byte, times in s, rates
        in bit/s); ``logs.attrs["wall_s"]`` is the run's wall-clock time (s) from the first process started to the
        last one ended. ``events`` is the server's event list (``events.json``: dicts with ``"event"`` =
        ``"listening"``, ``"joined"``, ``"turn_done"``, ``"turn_failed"``, ``"skipped"``, ...).
    Raises:
        ValueError: bad config or overrides (:func:`run_config_dict`), an override of ``dist.port`` /
            ``dist.output_dir``, ``timeout_s`` <= 0.
        RuntimeError: a process exited with a non-zero code or was killed at the timeout (the message gives every
            exit code, server first, and the end of the processes' log), or the server wrote no logs.
    """


    check_positive("timeout_s", timeout_s)
    for k in RESERVED_DIST_KEYS:
        if k in ((overrides or {}).get("dist") or {}):
            raise InvalidParameterError(f"overrides['dist'][{k!r}] is invalid: run_distributed_local sets dist.{k} itself "
                             f"(must be left out; pick the folder with workdir)")
    cfg = run_config_dict(config, overrides)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="splitlora-dist-") as tmp:
            return run_distributed_local(config, overrides, tmp, timeout_s)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    dist = dict(cfg.get("dist") or {})
    dist.update(port=free_port(dist.get("addr", "127.0.0.1")), output_dir=str(out))
    cfg["dist"] = dist
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / "processes.log"
    t0 = time.perf_counter()
    codes = launch_local(path, extra_env=PROCESS_ENV, timeout_s=timeout_s, log_path=log)
    wall = time.perf_counter() - t0
    if any(codes) or not (out / "logs.json").exists():
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"distributed run of {str(path)!r} failed: exit codes (server, devices...) {codes} "
                           f"after {wall:.1f} s (timeout_s={timeout_s}); end of {log}:\n{tail}")
    logs = pd.DataFrame(json.loads((out / "logs.json").read_text()))
    events = json.loads((out / "events.json").read_text())
    logs.attrs["wall_s"] = wall
    return logs, events


def compare_with_in_process(config, overrides: dict | None = None, workdir=None) -> pd.DataFrame:
    """Run ``config`` distributed (:func:`run_distributed_local`) and in-process
    (:func:`splitlora.distributed.plan.run_in_process`, leaving out the turns the server skipped) and tabulate.

    Args:
        config, overrides, workdir: as :func:`run_distributed_local`.
    Returns:
        One row per mini-batch (columns :data:`TABLE_COLUMNS`): step, round, device (index), device_name,
        channel_state, cut_layer, loss_distributed and loss_in_process (mean token cross-entropy, nat),
        loss_abs_diff, smashed_bytes (measured, byte), model_smashed_bytes (the profile's S(c), byte),
        rate_up_bps (the emulated rate: channel-state rate x ``link.rate_scale``, bit/s), t_up_s (measured
        up-link time of the smashed data, s), pred_up_s (the model's 8 S / R at that rate, s) and t_up_over_pred
        (their ratio; NaN where nothing was sent, i.e. cut = L). ``attrs["distributed_wall_s"]``: the
        distributed run's wall-clock time (s).
    Raises:
        ValueError, RuntimeError: as :func:`run_distributed_local`; RuntimeError also when the two runs did not
            train the same (round, device, cut) sequence.
    """
    cfg = config_from_dict(run_config_dict(config, overrides))
    logs, events = run_distributed_local(config, overrides, workdir)
    skip = [(int(e["round"]), int(e["device"])) for e in events if e.get("event") == "skipped"]
    cuts = None
    if cfg.link.rate_source == "measured":  # CARD saw measured rates: replay the cuts the server logged
        cuts = [[0] * cfg.num_devices for _ in range(cfg.rounds)]
        for n, m, c in zip(logs["round"], logs["device"], logs["cut_layer"]):
            cuts[int(n)][int(m)] = int(c)
    ref = run_in_process(cfg, skip=skip, cuts=cuts).logs
    got = list(zip(logs["round"], logs["device"], logs["cut_layer"]))
    want = [(x.round, x.device, x.cut_layer) for x in ref]
    if got != want:
        raise RuntimeError(f"the distributed and in-process runs trained different turns: (round, device, cut) "
                           f"{got} vs {want}")
    t = logs.copy()
    t["device_name"] = [cfg.devices[int(m)] for m in t["device"]]
    t["loss_distributed"] = t["loss"].astype(float)
    t["loss_in_process"] = [float(x.loss) for x in ref]
    t["loss_abs_diff"] = (t["loss_distributed"] - t["loss_in_process"]).abs()
    sent = t["pred_up_s"] > 0
    t["t_up_over_pred"] = (t["t_up_s"] / t["pred_up_s"].where(sent)).astype(float)
    out = t[list(TABLE_COLUMNS)].reset_index(drop=True)
    out.attrs["distributed_wall_s"] = logs.attrs.get("wall_s", math.nan)
    return out


def transfer_accuracy(table: pd.DataFrame) -> pd.DataFrame:
    """Measured / predicted up-link time of the smashed data per channel state.

    Args:
        table: :func:`compare_with_in_process`'s table (needs ``channel_state`` and ``t_up_over_pred``); rows
            with a NaN ratio (nothing sent) are left out.
    Returns:
        One row per channel state present (Good, Normal, Poor order): channel_state, steps (rows with a ratio),
        mean_ratio (mean of t_up / pred), mean_abs_rel_err and worst_abs_rel_err (mean and largest
        |t_up / pred - 1| over the steps, dimensionless).
    Raises:
        ValueError: ``table`` lacks one of the two columns.
    """
    missing = [c for c in ("channel_state", "t_up_over_pred") if c not in getattr(table, "columns", ())]
    if missing:
        raise InvalidParameterError(f"table is invalid: must have columns {missing} (compare_with_in_process's table)")
    t = table.dropna(subset=["t_up_over_pred"])
    err = (t["t_up_over_pred"] - 1).abs()
    g = t.assign(err=err).groupby("channel_state")
    res = pd.DataFrame({"steps": g.size(), "mean_ratio": g["t_up_over_pred"].mean(),
                        "mean_abs_rel_err": g["err"].mean(), "worst_abs_rel_err": g["err"].max()})
    order = [s for s in CHANNEL_STATES if s in res.index] + sorted(set(res.index) - set(CHANNEL_STATES))
    return res.loc[order].rename_axis("channel_state").reset_index()

"""Entry points of distributed runs: one role from RANK / WORLD_SIZE, or every role on this host (``--local``).

Source: docs/distributed.md.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import replace

from splitlora._validate import check_int_range
from splitlora.distributed.config import SPLITFED_MODES, RunConfig, check_run_config, load_config, parse_set
from splitlora.distributed.parallel_roles import ParallelServer
from splitlora.distributed.roles import Device, RunIncomplete, Server
from splitlora.distributed.wire import SECRET_ENV
from splitlora.errors import InvalidParameterError


# ============================================================================================ entry points
def run_role(cfg: RunConfig, rank: int, world_size: int) -> int:
    """Run rank ``rank`` of ``world_size`` = devices + 1 (0: server). Returns the exit code: 1 for a server whose
    run trained fewer mini-batches than configured (the reason printed; earlier outputs left as they were)."""
    if world_size != cfg.num_devices + 1:
        raise InvalidParameterError(f"WORLD_SIZE={world_size} is invalid: must be {cfg.num_devices + 1} "
                         f"(one server + {cfg.num_devices} devices of the configuration)")
    check_int_range("RANK", rank, 0, world_size - 1)
    check_run_config(cfg)
    if rank == 0:
        server = (Server if cfg.mode == "sequential" else ParallelServer)(cfg)
        try:
            server.serve()
        except RunIncomplete as err:
            print(f"[splitlora server] {err}", file=sys.stderr, flush=True)
            return 1
        print(run_summary(server), flush=True)
        return 0
    return Device(cfg, rank - 1).serve()


def run_summary(server: Server) -> str:
    """One line at the end of a complete run: rounds, mini-batches, the measured up-link time of the smashed data
    against the model's 8 S / R at the emulated rate, the server's compute time, and where the adapter is."""
    logs = server.logs
    up = [x for x in logs if x.smashed_bytes > 0 and x.t_up_s > 0]
    measured, predicted = sum(x.t_up_s for x in up), sum(x.pred_up_s for x in up)
    ratio = f" ({measured / predicted:.3f}x)" if predicted > 0 else ""
    return (f"[splitlora] run complete: {server.cfg.rounds} rounds, {len(logs)} mini-batches of "
            f"{server.cfg.num_devices} devices; smashed-data up-link {measured:.3f} s measured vs {predicted:.3f} s "
            f"predicted{ratio}; server compute {sum(x.server_time_s for x in logs):.3f} s; adapter written to "
            f"{server.out / 'adapter'}")


def dry_run(cfg: RunConfig):
    """The plan of a run without starting it: per round and device, the channel state and rate, the cut layer (and
    CARD's cut for ``card_scenario``'s model), the server clock CARD picks for it, and the model's predicted delay
    (s) and server energy (J) of the device's turn. Loads no model weights (only configurations).

    With ``link.rate_source: measured`` CARD later sees measured rates: the plan shows the model's rates.
    Returns: a pandas DataFrame, one row per (round, device): round, device, device_name, channel_state,
        rate_mbps, cut_layer (trained model), planning_cut, clock_ghz (0: server idle), delay_s, energy_j.
    Raises: InvalidParameterError for an invalid configuration (:func:`check_run_config`).
    """
    import pandas as pd

    from splitlora.distributed import plan as pl
    from splitlora.model.card import best_clock_hz

    check_run_config(cfg)
    name = cfg.model.get("name_or_path")
    if name is None:
        from splitlora.training.models import tiny_llama_config

        hf_config = tiny_llama_config(**{k: v for k, v in cfg.model.items() if k != "seed"})
    else:
        from splitlora.training.models import load_hf_config

        hf_config = load_hf_config(name)
    model, prof = pl.cost_model(cfg, hf_config)
    units = prof.n_cuts
    states, rates = pl.channel_rates(cfg)
    if cfg.mode != "sequential":
        return pd.DataFrame(_dry_run_parallel(cfg, model, units, states, rates))
    rows = []
    for n in range(cfg.rounds):
        for m in range(cfg.num_devices):
            P, M = pl.device_profile(cfg, m)
            R = float(rates[n, m])
            cut = pl.decide_cut(cfg, model, n, m, P, M, R, units)
            if cfg.cut == "card":
                d = pl.card_decision(cfg, model, P, M, R)
                planned, f, delay, energy = (int(d.cut_layer[0]), float(d.frequency_hz[0]), float(d.delay_s[0]),
                                             float(d.energy_j[0]))
            else:  # a fixed cut: the clock that is best for it
                planned = round(cut * model.n_cuts / units)  # in the planning model's units
                f = float(best_clock_hz(model, [planned], [P], [R], [R], cfg.w, discrete_clocks=True)[0]) \
                    if planned < model.n_cuts else 0.0
                delay, energy = (float(x[0]) for x in model.evaluate([planned], [f or model.f_max_hz], [P], [R], [R]))
            rows.append({"round": n, "device": m, "device_name": cfg.devices[m], "channel_state": str(states[n, m]),
                         "rate_mbps": R / 1e6, "cut_layer": cut, "planning_cut": planned, "clock_ghz": f / 1e9,
                         "delay_s": delay, "energy_j": energy})
    return pd.DataFrame(rows)


def _dry_run_parallel(cfg: RunConfig, model, units: int, states, rates) -> list[dict]:
    """:func:`dry_run`'s rows for a parallel mode: the round's cuts (:func:`~splitlora.distributed.plan.round_cuts`),
    each device's clock share (splitfed with CARD: the parallel CARD's; else equal shares of f_max) and finish time
    and server energy of the parallel schedule (:meth:`~splitlora.model.system.CostModel.parallel_round`)."""
    import numpy as np

    from splitlora.distributed import plan as pl
    from splitlora.model.parallel import card_parallel

    M = cfg.num_devices
    prof = [pl.device_profile(cfg, m) for m in range(M)]
    P, Mem = np.array([[p[0] for p in prof]]), np.array([[p[1] for p in prof]])
    rows = []
    for n in range(cfg.rounds):
        R = rates[n][None, :]
        cuts = pl.round_cuts(cfg, model, n, prof, rates[n], units)
        if cfg.mode in SPLITFED_MODES and cfg.cut == "card":
            d = card_parallel(model, P, R, R, Mem, cfg.w, discrete_clocks=True)
            planned, f, delay, energy = d.cut_layer[0], d.frequency_hz[0], d.delay_s[0], d.energy_j[0]
        else:
            planned = np.array([[round(c * model.n_cuts / units) for c in cuts]])
            f = np.where(planned < model.n_cuts, model.f_max_hz / max(int((planned < model.n_cuts).sum()), 1), 0.0)
            _, _, delay, energy = model.parallel_round(planned, f, P, R, R)
            planned, f, delay, energy = planned[0], f[0], delay[0], energy[0]
        rows += [{"round": n, "device": m, "device_name": cfg.devices[m], "channel_state": str(states[n, m]),
                  "rate_mbps": float(rates[n, m]) / 1e6, "cut_layer": int(cuts[m]), "planning_cut": int(planned[m]),
                  "clock_ghz": float(f[m]) / 1e9, "delay_s": float(delay[m]), "energy_j": float(energy[m])}
                 for m in range(M)]
    return rows


def _override(cfg: RunConfig, args) -> RunConfig:
    kw = {k: getattr(args, k) for k in ("addr", "port", "checkpoint_dir", "output_dir")
          if getattr(args, k, None) is not None}
    return replace(cfg, dist=replace(cfg.dist, **kw)) if kw else cfg


def launch_local(config_path, *, extra_env: dict | None = None, timeout_s: float = 3600, args=(),
                 log_path=None, overrides: dict | None = None) -> list[int]:
    """Start the server and every device of ``config_path`` as processes on this host and wait for them.

    Args:
        config_path: the run configuration (YAML/JSON). extra_env: added to each process's environment.
        timeout_s: the longest the whole run may take (s); then the processes still running are killed.
        args: extra command-line arguments of every process (``--addr=...``, ``--set=...``). log_path: file that
            receives the processes' stdout and stderr (appended), or None for this process's own. overrides: the
            ``--set`` values in ``args`` as :func:`~splitlora.distributed.config.parse_set` gives them, checked here.
    The whole configuration is checked first (:func:`~splitlora.distributed.config.check_run_config`); a port already in
    use on this host is replaced by a free one (printed); if the server fails, the devices are stopped at once.
    Without ``dist.secret_file`` or ``SPLITLORA_SECRET`` (in ``extra_env`` or this environment) a random shared
    secret is generated for the processes of this run.
    Returns: exit codes, server first (-9 for a process killed at the timeout or after the server failed).
    Raises: ValueError for an invalid configuration (naming the field).
    """
    cfg = load_config(config_path, check=True, overrides=overrides)  # a bad file fails here, not in 3 processes
    world = cfg.num_devices + 1
    addr, port = cfg.dist.addr, cfg.dist.port
    for a in args:
        addr = a.split("=", 1)[1] if a.startswith("--addr=") else addr
        port = int(a.split("=", 1)[1]) if a.startswith("--port=") else port
    if not _port_free(addr, port):
        new = free_port(addr)
        print(f"[splitlora] dist.port={port} is in use on {addr}: this local run uses port {new}", file=sys.stderr)
        args = [*args, f"--port={new}"]
    extra_env = dict(extra_env or {})
    if cfg.dist.secret_file is None and not (extra_env.get(SECRET_ENV) or os.environ.get(SECRET_ENV)):
        extra_env[SECRET_ENV] = secrets.token_hex(32)
    procs = []
    with contextlib.ExitStack() as stack:
        out = None if log_path is None else stack.enter_context(open(log_path, "ab"))
        for r in range(world):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                   **extra_env}
            procs.append(subprocess.Popen([sys.executable, "-m", "splitlora.distributed", "--config",
                                           str(config_path), *args], env=env, stdout=out,
                                          stderr=None if out is None else subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if procs[0].poll() not in (None, 0):  # the server failed: the devices would only wait for it
                print(f"[splitlora] the server exited with code {procs[0].returncode}: stopping the devices",
                      file=sys.stderr)
                break
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.kill()
        codes = [p.wait() for p in procs]
    return codes


def _port_free(addr: str, port: int) -> bool:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``addr`` a moment ago (bound to port 0 and released)."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML/JSON run configuration (RunConfig fields)")
    p.add_argument("--rank", type=int, help="role: 0 = server, m = device m-1 (default: $RANK)")
    p.add_argument("--world-size", type=int, help="devices + 1 (default: $WORLD_SIZE)")
    p.add_argument("--addr", help="server address to bind/connect (default: config, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="server store port (default: config)")
    p.add_argument("--checkpoint-dir", dest="checkpoint_dir")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--local", action="store_true", help="start every role on this host as subprocesses")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set rounds=2 --set dist.timeout_s=5 (YAML values)")
    p.add_argument("--dry-run", action="store_true", dest="dry_run",
                   help="print the planned cuts and clocks per round and device and the predicted delay and "
                        "energy, then exit without starting any process")


def run_from_args(args) -> int:
    overrides = parse_set(getattr(args, "set", None))
    if getattr(args, "dry_run", False):
        cfg = _override(load_config(args.config, overrides=overrides), args)
        table = dry_run(cfg)
        with pd_options():
            print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        print(f"[splitlora] dry run: {cfg.rounds} rounds x {cfg.num_devices} devices planned; predicted delay "
              f"{table.delay_s.sum():.4g} s (turns one after another) and server energy {table.energy_j.sum():.4g} J; "
              "nothing was started")
        return 0
    if args.local:
        extra = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("addr", "port", "checkpoint_dir", "output_dir")
                 if getattr(args, k) is not None] + [f"--set={item}" for item in getattr(args, "set", None) or ()]
        codes = launch_local(args.config, args=extra, overrides=overrides)
        print(f"exit codes (server, devices...): {codes}")
        return max(codes)
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "-1"))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "0"))
    if rank < 0 or world < 1:
        raise SystemExit("no role: give --rank/--world-size, set RANK/WORLD_SIZE (torchrun does), or use --local")
    return run_role(_override(load_config(args.config, overrides=overrides), args), rank, world)


@contextlib.contextmanager
def pd_options():
    """Print a whole plan table (no column wrapping)."""
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_rows", 10_000):
        yield


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitlora.distributed", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

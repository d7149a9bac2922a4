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
from splitlora.distributed.config import RunConfig, check_run_config, load_config
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
        try:
            Server(cfg).serve()
        except RunIncomplete as err:
            print(f"[splitlora server] {err}", file=sys.stderr, flush=True)
            return 1
        return 0
    return Device(cfg, rank - 1).serve()


def _override(cfg: RunConfig, args) -> RunConfig:
    kw = {k: getattr(args, k) for k in ("addr", "port", "checkpoint_dir", "output_dir")
          if getattr(args, k, None) is not None}
    return replace(cfg, dist=replace(cfg.dist, **kw)) if kw else cfg


def launch_local(config_path, *, extra_env: dict | None = None, timeout_s: float = 3600, args=(),
                 log_path=None) -> list[int]:
    """Start the server and every device of ``config_path`` as processes on this host and wait for them.

    Args:
        config_path: the run configuration (YAML/JSON). extra_env: added to each process's environment.
        timeout_s: the longest the whole run may take (s); then the processes still running are killed.
        args: extra command-line arguments of every process (``--addr=...``). log_path: file that receives the
            processes' stdout and stderr (appended), or None for this process's own.
    The whole configuration is checked first (:func:`~splitlora.distributed.config.check_run_config`); a port already in
    use on this host is replaced by a free one (printed); if the server fails, the devices are stopped at once.
    Without ``dist.secret_file`` or ``SPLITLORA_SECRET`` (in ``extra_env`` or this environment) a random shared
    secret is generated for the processes of this run.
    Returns: exit codes, server first (-9 for a process killed at the timeout or after the server failed).
    Raises: ValueError for an invalid configuration (naming the field).
    """
    cfg = load_config(config_path, check=True)  # a bad file fails here, not in 3 processes
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

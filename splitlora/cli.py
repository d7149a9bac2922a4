"""The ``splitlora`` command: ``train-distributed``, ``reproduce``, ``env`` (``splitlora <command> --help``).

An invalid configuration or parameter exits with status 2 and one line on stderr naming the key, its value and what
is allowed (before any process starts); ``splitlora --debug ...`` shows the traceback instead."""
from __future__ import annotations

import argparse
import platform
import sys

from splitlora.errors import InvalidParameterError


def _env(args) -> int:
    """Print versions and which GPU backends are usable (the environment report)."""
    from importlib.metadata import PackageNotFoundError, version

    print(f"python       {platform.python_version()} ({sys.executable})")
    for pkg in ("torch", "transformers", "peft", "numpy", "splitlora"):
        try:
            print(f"{pkg:<12} {version(pkg)}")
        except PackageNotFoundError:
            print(f"{pkg:<12} not installed")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(f"cuda         {'usable: ' + torch.cuda.get_device_name(0) if cuda else 'not usable'}"
              f" (torch built with CUDA {torch.version.cuda})")
        import torch.distributed as dist

        print(f"distributed  {'gloo' if dist.is_available() and dist.is_gloo_available() else 'no gloo'}"
              f"{', nccl' if dist.is_available() and dist.is_nccl_available() else ''}")
    except Exception as err:  # noqa: BLE001 - a report, not a check
        print(f"cuda         unknown ({err})")
    try:
        from splitlora.gpu import get_gpu_backend

        backend = get_gpu_backend("auto")
        print(f"gpu backend  {type(backend).__name__} (NVML / Jetson usable)")
    except Exception as err:  # noqa: BLE001
        print(f"gpu backend  none usable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else err!r})")
    return 0


def _reproduce(args) -> int:
    from splitlora.experiments.notebooks import run_notebooks

    run = run_notebooks(smoke=args.smoke, only=args.only)
    print(f"notebooks found: {len(run.found)}, executed: {len(run.executed)}, failed: {len(run.failed)}")
    return 0 if not run.failed else 1


def _train_distributed(args) -> int:
    from splitlora.distributed.launch import run_from_args

    return run_from_args(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="splitlora", description="Energy-efficient split LoRA fine-tuning (arXiv 2412.00090)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-distributed", help="run a server or device role (torchrun), or all roles locally")
    from splitlora.distributed.launch import add_arguments

    add_arguments(t)
    t.set_defaults(func=_train_distributed)
    r = sub.add_parser("reproduce", help="execute the notebooks (figures)")
    r.add_argument("--smoke", action="store_true", help="small problem sizes")
    r.add_argument("--only", nargs="*", help="notebook names (stems) to run")
    r.set_defaults(func=_reproduce)
    e = sub.add_parser("env", help="print versions and usable GPU backends")
    e.set_defaults(func=_env)
    args = p.parse_args(argv)
    return reporting_invalid(lambda: args.func(args), f"splitlora {args.command}", debug=args.debug)


def reporting_invalid(run, prog: str, debug: bool = False) -> int:
    """``run()``'s exit code; a bad configuration or parameter (InvalidParameterError, a missing file) is printed
    as one line ``<prog>: error: <key>=<value> is invalid: must be ...`` on stderr, without a traceback, and gives
    exit code 2; with ``debug`` it is raised (full traceback)."""
    try:
        return run()
    except (InvalidParameterError, FileNotFoundError, IsADirectoryError) as err:
        if debug:
            raise
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Execute the notebooks under ``notebooks/`` with papermill (``make reproduce``, ``splitlora reproduce``).

Each notebook is executed from a copy into ``notebooks/executed/`` (git-ignored), so the committed sources stay
free of outputs; the notebooks themselves write ``figures/``. ``run_notebooks`` returns how many were found and
executed and raises if any failed, so a caller can check that the count executed equals the count found.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from splitlora.errors import InvalidParameterError
from splitlora.experiments.parameters import declared_parameters
from splitlora.paths import NOTEBOOKS_DIR

KERNEL_NAME = "python3"


@dataclass
class NotebookRun:
    """Result of :func:`run_notebooks`: notebooks found, executed (in order), failures {name: error}, seconds each."""
    found: list = field(default_factory=list)
    executed: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def find_notebooks(folder: Path = NOTEBOOKS_DIR, only=None) -> list[Path]:
    """Sorted ``*.ipynb`` under ``folder`` (not ``executed/``); ``only``: names (stems) to keep.

    Raises: ValueError if a name in ``only`` matches no notebook (listing the known ones).
    """
    nbs = sorted(p for p in Path(folder).glob("*.ipynb"))
    if only:
        stems = {p.stem: p for p in nbs}
        unknown = [o for o in only if o not in stems]
        if unknown:
            raise InvalidParameterError(f"only={unknown!r} is invalid: must be names from {sorted(stems)}")
        nbs = [stems[o] for o in only]
    return nbs


def run_notebooks(parameters: dict | None = None, *, only=None, smoke: bool = False, folder: Path = NOTEBOOKS_DIR,
                  out_dir: Path | None = None, timeout_s: int = 1800, stop_on_error: bool = True) -> NotebookRun:
    """Execute notebooks with papermill, injecting ``parameters`` (and ``smoke``) into each one's parameters cell.

    Args:
        parameters: extra values for the parameters cells (each notebook gets the names it declares; a name that no
            selected notebook declares is refused before any notebook runs).
        only: notebook stems to run (default: all); smoke: pass ``smoke=True`` (figures then go to
            ``<out_dir>/figures`` unless ``$SPLITLORA_FIGURES_DIR`` is set); timeout_s: per cell (s).
    Returns:
        :class:`NotebookRun`.
    Raises:
        InvalidParameterError: a parameter that no selected notebook declares.
        RuntimeError: a notebook failed (after all others ran if ``stop_on_error`` is False), with its error.
    """
    import papermill as pm

    out_dir = Path(out_dir or Path(folder) / "executed")
    out_dir.mkdir(parents=True, exist_ok=True)
    if smoke and "SPLITLORA_FIGURES_DIR" not in os.environ:
        # smoke figures are not the committed ones: keep them beside the executed notebooks
        with _env("SPLITLORA_FIGURES_DIR", str(out_dir / "figures")):
            return run_notebooks(parameters, only=only, smoke=smoke, folder=folder, out_dir=out_dir,
                                 timeout_s=timeout_s, stop_on_error=stop_on_error)
    run = NotebookRun(found=[p.stem for p in find_notebooks(folder)])
    selected = find_notebooks(folder, only)
    declared_by = {nb.stem: declared_parameters(nb) for nb in selected}
    unknown = sorted(set(parameters or {}) - set().union(*declared_by.values()))
    if unknown:
        raise InvalidParameterError(f"parameters={unknown!r} are invalid: no selected notebook takes them "
                                    f"(they take {sorted(set().union(*declared_by.values()))})")
    for nb in selected:
        params = dict(parameters or {})
        params["smoke"] = bool(smoke)
        declared = declared_by[nb.stem]
        params = {k: v for k, v in params.items() if k in declared}
        t0 = time.perf_counter()
        print(f"[splitlora] executing {nb.name} {params}", file=sys.stderr, flush=True)
        try:
            pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters=params, kernel_name=KERNEL_NAME,
                                cwd=str(nb.parent), progress_bar=False, execution_timeout=timeout_s)
        except Exception as err:  # papermill raises PapermillExecutionError with the cell's traceback
            run.failed[nb.stem] = err
            if stop_on_error:
                raise RuntimeError(f"notebook {nb.name} failed: {err}") from err
            continue
        finally:
            run.seconds[nb.stem] = time.perf_counter() - t0
        run.executed.append(nb.stem)
    if run.failed:
        raise RuntimeError(f"notebooks failed: {sorted(run.failed)}: " + "; ".join(map(str, run.failed.values())))
    return run


def main(argv=None) -> int:
    """``python -m splitlora.experiments.notebooks [--smoke] [--only NAME ...]``: execute notebooks, print the counts.

    Returns 0 when every notebook found was executed, 1 otherwise.
    """
    ap = argparse.ArgumentParser(prog="python -m splitlora.experiments.notebooks", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="shrink each problem (smoke=True in every notebook)")
    ap.add_argument("--only", nargs="*", default=None, help="notebook names (stems) to run; default: all")
    args = ap.parse_args(argv)
    run = run_notebooks(smoke=args.smoke, only=args.only)
    wanted = len(args.only) if args.only else len(run.found)
    for name in run.executed:
        print(f"executed {name:32s} {run.seconds[name]:7.1f} s")
    print(f"{len(run.executed)} of {wanted} notebooks executed")
    return 0 if len(run.executed) == wanted else 1


if __name__ == "__main__":
    raise SystemExit(main())

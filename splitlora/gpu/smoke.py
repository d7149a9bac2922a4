"""Read-only NVIDIA GPU smoke test: ``python -m splitlora.gpu.smoke`` or ``python scripts/gpu_smoke.py``.

Lists the supported graphics clocks and measures the energy, time and mean power of a fixed float16 matmul
workload; it sets a clock only when both ``--lock-clock-mhz`` and ``--allow-clock-control`` are given. Exit codes:
:func:`main`. Source: docs/model.md, "GPU clock and energy backends".
"""
from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Callable

from .common import (ClockControlNotAllowedError, ClockPermissionError, GPUBackendError, GPUNotAvailableError,
                     NotSupportedError, clock_control_allowed)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_GPU, EXIT_PERMISSION, EXIT_NOT_SUPPORTED = 0, 1, 2, 3, 4, 5


def matmul_workload(gpu_index: int, size: int, iters: int) -> Callable[[], float]:
    """Return a function running ``iters`` float16 (size x size) matmuls on ``cuda:<gpu_index>`` and
    synchronising; it returns the FLOP count (2 size^3 iters).

    Raises:
        GPUNotAvailableError: torch is built without CUDA or sees no GPU.
    """
    import torch

    if not torch.cuda.is_available():
        raise GPUNotAvailableError("torch sees no CUDA device (CPU-only build or no GPU)")
    dev = torch.device("cuda", gpu_index)
    a = torch.randn(size, size, device=dev, dtype=torch.float16)
    b = torch.randn(size, size, device=dev, dtype=torch.float16)
    torch.cuda.synchronize(dev)

    def run() -> float:
        for _ in range(iters):
            a @ b
        torch.cuda.synchronize(dev)
        return 2.0 * size ** 3 * iters

    return run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit codes: 0 ok, 2 usage/not opted in, 3 no NVIDIA GPU, "
                                       "4 permission denied, 5 not supported, 1 other error")
    p.add_argument("--gpu-index", type=int, default=0, help="NVML/CUDA device index (default 0)")
    p.add_argument("--size", type=int, default=8192, help="matrix size N of the N x N matmul (default 8192)")
    p.add_argument("--iters", type=int, default=200, help="matmuls per measurement (default 200)")
    p.add_argument("--lock-clock-mhz", type=float, default=None,
                   help="lock the graphics clock to the supported clock nearest this (MHz) during the workload")
    p.add_argument("--allow-clock-control", action="store_true",
                   help="required with --lock-clock-mhz: allow this script to change the GPU clock")
    return p


def main(argv: list[str] | None = None, *, pynvml_module: ModuleType | None = None,
         workload: Callable[[], object] | None = None) -> int:
    """Run the smoke test; return the exit code.

    Exit codes: 0 success; 2 usage error, or clock locking asked for without the opt-in; 3 no NVIDIA GPU (no NVML
    library/driver, no device at ``--gpu-index``, or torch without CUDA); 4 permission denied (NVML NoPermission
    while locking clocks); 5 not supported (no supported-clock list or energy counter on this GPU); 1 any other GPU
    backend error (docs/model.md, "GPU clock and energy backends"). ``pynvml_module`` and ``workload`` let tests
    substitute a fake NVML and a CPU workload."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.lock_clock_mhz is not None and not clock_control_allowed(args.allow_clock_control):
        parser.print_usage(sys.stderr)
        print("gpu_smoke: --lock-clock-mhz changes the GPU clock; add --allow-clock-control "
              "(or set SPLITLORA_ALLOW_CLOCK_CONTROL=1) to allow it", file=sys.stderr)
        return EXIT_USAGE
    from .nvml import NVMLBackend

    try:
        gpu = NVMLBackend(args.gpu_index, allow_clock_control=args.allow_clock_control, pynvml_module=pynvml_module)
    except GPUNotAvailableError as exc:
        print(f"gpu_smoke: no NVIDIA GPU: {exc}", file=sys.stderr)
        return EXIT_NO_GPU
    try:
        with gpu:
            print(f"GPU {args.gpu_index}: {gpu.device_name()}")
            try:
                clocks = gpu.supported_clocks_mhz()
                print(f"supported graphics clocks: {len(clocks)} from {clocks[0]:.0f} to {clocks[-1]:.0f} MHz: "
                      + " ".join(f"{c:.0f}" for c in clocks))
            except NotSupportedError as exc:
                print(f"supported graphics clocks: not supported ({exc})")
            print(f"current graphics clock: {gpu.current_clock_mhz():.0f} MHz")
            run = workload if workload is not None else matmul_workload(args.gpu_index, args.size, args.iters)
            run()  # warm-up
            if args.lock_clock_mhz is not None:
                with gpu.locked_clock(args.lock_clock_mhz * 1e6) as lock:
                    print(f"locked graphics clock: target {lock.target_mhz:.0f} MHz, read back "
                          f"{lock.readback_mhz:.0f} MHz")
                    with gpu.energy_window() as w:
                        run()
                print(f"clock reset; current graphics clock: {gpu.current_clock_mhz():.0f} MHz")
            else:
                with gpu.energy_window() as w:
                    run()
            m = w.measurement
            print(f"workload: {m.time_s:.3f} s, {m.energy_j:.3f} J, {m.average_power_w:.1f} W")
        return EXIT_OK
    except GPUNotAvailableError as exc:
        print(f"gpu_smoke: no NVIDIA GPU: {exc}", file=sys.stderr)
        return EXIT_NO_GPU
    except ClockPermissionError as exc:
        print(f"gpu_smoke: permission denied: {exc}", file=sys.stderr)
        return EXIT_PERMISSION
    except NotSupportedError as exc:
        print(f"gpu_smoke: not supported: {exc}", file=sys.stderr)
        return EXIT_NOT_SUPPORTED
    except ClockControlNotAllowedError as exc:  # pragma: no cover - caught above
        print(f"gpu_smoke: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GPUBackendError as exc:
        print(f"gpu_smoke: GPU backend error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

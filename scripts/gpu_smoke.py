#!/usr/bin/env python
"""Read-only NVIDIA GPU smoke test (clocks, energy counter around a matmul workload).

Same as ``python -m splitlora.gpu.smoke``; see splitlora/gpu/smoke.py for the options.
Exit codes: 0 ok, 2 usage / clock locking without --allow-clock-control, 3 no NVIDIA GPU,
4 permission denied, 5 not supported, 1 other GPU error.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from splitlora.gpu.smoke import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

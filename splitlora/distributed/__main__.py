"""``python -m splitlora.distributed``: run one role of a distributed run (docs/distributed.md)."""
import sys

from splitlora.cli import reporting_invalid
from splitlora.distributed.launch import main

sys.exit(reporting_invalid(main, "python -m splitlora.distributed"))

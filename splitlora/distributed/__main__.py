"""``python -m splitlora.distributed``: run one role of a distributed run (docs/distributed.md)."""
import sys

from splitlora.distributed.launch import main

sys.exit(main())

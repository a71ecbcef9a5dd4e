"""`python -m megamoe ...` (what `deepspeed --module megamoe ...` runs on every rank)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m magsdk``: the ``magsdk`` command, e.g. under ``torchrun --nproc-per-node N -m magsdk calibrate ...``."""

import sys

from magsdk.cli import main

sys.exit(main())

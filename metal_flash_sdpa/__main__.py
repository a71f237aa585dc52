"""``python -m metal_flash_sdpa``: see ``cli``."""

import sys

from .cli import main

sys.exit(main())

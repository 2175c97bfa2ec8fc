"""``python -m fedscan``: the ``fedscan`` command line."""

import sys

from fedscan.simulations.cli import main

sys.exit(main())

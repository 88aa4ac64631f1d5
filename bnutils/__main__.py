"""``python -m bnutils``: the command line of :mod:`bnutils.cli`."""

import sys

from bnutils.cli import main

sys.exit(main())

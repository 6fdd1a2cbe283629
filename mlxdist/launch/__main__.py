"""``python -m mlxdist.launch``: see :mod:`mlxdist.launch.cli`."""

import sys

from mlxdist.launch.cli import main

sys.exit(main())

"""``python -m mlxdist.serve``: see :mod:`mlxdist.serve.cli`."""

import sys

from mlxdist.serve.cli import main

sys.exit(main())

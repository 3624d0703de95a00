"""``python -m hwlm.cli``: the same as the ``hwlm`` command."""

import sys

from hwlm.cli.main import main

sys.exit(main())

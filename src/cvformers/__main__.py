"""``python -m cvformers``: the same as the ``cvformers`` command."""

import sys

from cvformers.cli import main

sys.exit(main())

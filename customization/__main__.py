"""``python -m customization``: see customization/cli.py."""

import sys

from customization.cli import main

sys.exit(main())

"""`python -m vlmkit ...` is the `vlmkit` command."""

import sys

from .cli import main

sys.exit(main())

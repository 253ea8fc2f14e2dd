"""`python -m bench` from the repository root: the comparison suite of bench/run.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench's modules import each other by their names

from run import main  # noqa: E402

sys.exit(main())

"""The command-line tests: `kira` runs in a subprocess (see `_cli_support`)."""

from __future__ import annotations

import sys
from pathlib import Path

# Keep `_cli_support` importable by name whatever the pytest import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

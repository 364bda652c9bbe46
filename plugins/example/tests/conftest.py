"""Make ``fluxkiln_example`` importable when the tests run from the repository root without installing it."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("fluxkiln_example") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

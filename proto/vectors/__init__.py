"""Machine-readable test vectors for the Continuum wire format (see proto/SPEC.md).

The JSON files beside this module are produced by `python -m proto.vectors.generate`
from fixed seeds and fixed "random" bytes, so another implementation can check
itself byte for byte.  `load(name)` reads one of them.
"""

from __future__ import annotations

import json
from pathlib import Path

VECTOR_DIR = Path(__file__).resolve().parent


def load(name: str) -> dict:
    """Parse the committed `<name>.json`."""
    return json.loads((VECTOR_DIR / f"{name}.json").read_text(encoding="utf-8"))

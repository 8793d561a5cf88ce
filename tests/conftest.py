"""Shared fixtures. Tests start real worker processes; nothing here mocks them."""

from __future__ import annotations

import sys
from pathlib import Path

# Test helpers (raw_worker, ...) live beside the tests; importlib mode needs them on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

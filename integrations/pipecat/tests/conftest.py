"""Make `synctalk_pipecat` importable however pytest is started (the venv's .pth also adds it)."""
from __future__ import annotations

import sys
from pathlib import Path

INTEGRATION = Path(__file__).resolve().parents[1]
if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))

"""Process environment for every entry point: telemetry off, tool homes inside the project.

Called from entry points (cli, flows, Makefile exports the same), never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def setup_env(root: str | Path = ".") -> None:
    root = Path(root).resolve()
    # The project this process works on: relative stores (the SQLite tracking URI) resolve against it, so no
    # caller needs to chdir there first (oel.tracking.resolve_uri).
    os.environ["OEL_PROJECT_ROOT"] = str(root)
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("HF_HOME", str(root / ".cache" / "huggingface"))

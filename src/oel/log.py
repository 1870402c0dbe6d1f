"""Logging set-up for entry points only (library modules just call logging.getLogger(__name__))."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("OEL_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store", "filelock", "textworld"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

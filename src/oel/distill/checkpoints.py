"""Which training checkpoint a rerun may trust, and when to throw the old ones away (no TRL here).

HF Trainer writes `checkpoint-<step>/` file by file, so a run killed mid-save leaves a folder that looks
like a checkpoint. We drop a COMPLETE marker into a folder only after the trainer has finished saving it
(the `on_save` callback fires after the save), and resume only from marked folders. A fingerprint of
everything that shapes the run (params, rows, start policy, world size) guards against resuming a run whose
inputs changed: a mismatch wipes the folder instead of silently continuing someone else's training.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from oel.artifacts import write_json, write_text

log = logging.getLogger(__name__)

COMPLETE = "oel_complete"
FINGERPRINT = "fingerprint.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint: Path) -> None:
    write_text(Path(checkpoint) / COMPLETE, "ok\n")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder, oldest first, complete or not."""
    if not Path(folder).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def latest_complete(folder: Path) -> Path | None:
    done = [p for _, p in checkpoints(folder) if (p / COMPLETE).is_file()]
    return done[-1] if done else None


def discard_incomplete(folder: Path) -> None:
    """A half-written checkpoint must not be picked up later (not by us, not by HF's rotation)."""
    for _, path in checkpoints(folder):
        if not (path / COMPLETE).is_file():
            log.warning("removing incomplete checkpoint %s (the run was killed while saving it)", path)
            shutil.rmtree(path, ignore_errors=True)


def prepare(folder: Path, fingerprint: dict[str, Any]) -> Path | None:
    """Reset the folder when its fingerprint differs, drop unfinished checkpoints; return the one to resume."""
    folder = Path(folder)
    stored = folder / FINGERPRINT
    current = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    if stored.is_file():
        try:
            previous = json.loads(stored.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != current:
            log.warning("%s holds checkpoints of a different run (params, rows or start policy changed); "
                        "starting over", folder)
            shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # no fingerprint: provenance unknown, not resumable
    folder.mkdir(parents=True, exist_ok=True)
    write_json(stored, current)
    discard_incomplete(folder)
    return latest_complete(folder)

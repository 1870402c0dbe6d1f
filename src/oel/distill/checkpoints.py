"""Which training checkpoint a rerun may trust, and when to throw the old ones away (no TRL here).

HF Trainer writes `checkpoint-<step>/` file by file, so a run killed mid-save leaves a folder that looks
like a checkpoint. We drop a COMPLETE marker into a folder only after the trainer has finished saving it
(the `on_save` callback fires after the save), and resume only from marked folders. A fingerprint of
everything that shapes the run (params, rows, start policy, world size) guards against resuming a run whose
inputs changed: a mismatch wipes the folder instead of silently continuing someone else's training.
A marked checkpoint whose files were damaged later (a disk filled, a copy cut short) is only lost
progress: it is dropped with one log line and the run resumes from the one before, or starts over.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from oel.artifacts import check_safetensors, write_json, write_text

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


def damage(checkpoint: Path) -> str | None:
    """Why a marked checkpoint cannot be resumed from, or None. Cheap: headers and archive directories only
    (torch's .pt/.pth/.bin files are zip archives; a cut or overwritten one has no readable directory)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file() or path.name == COMPLETE:
            continue
        name = path.relative_to(checkpoint)
        if path.suffix == ".json":
            try:
                if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                    return f"{name} is not a JSON object"
            except (OSError, ValueError, UnicodeDecodeError):
                return f"{name} is not valid JSON"
        elif path.suffix == ".safetensors" and (why := check_safetensors(path)):
            return why if str(name) == path.name else f"{name.parent}/{why}"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{name} is cut short or not a torch file"
    return None


def resumable(folder: Path) -> Path | None:
    """The newest marked checkpoint that is intact; damaged ones are removed, each with one log line."""
    for _, path in reversed(checkpoints(folder)):
        if not (path / COMPLETE).is_file():
            continue
        why = damage(path)
        if why is None:
            return path
        log.warning("%s is damaged (%s); discarding it and resuming from an earlier checkpoint, if any",
                    path, why)
        shutil.rmtree(path, ignore_errors=True)
    return None


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
        except (OSError, ValueError):  # cut short, not JSON, not UTF-8: provenance unknown
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
    return resumable(folder)

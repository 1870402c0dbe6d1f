"""JSON / JSONL / text read and write: schema-validated, atomic (temp file + rename), errors as file:line."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

from pydantic import BaseModel, ValidationError

from oel.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ArtifactError(UserError, ValueError):
    """A file that cannot be used; the message is `file:line: what is wrong`."""


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temp file beside `path`, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_json(path: str | Path, obj: object) -> None:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=False)
        fh.write("\n")


def read_json(path: str | Path, model: type[M] | None = None):
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (run the stage that writes it first)") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: a folder where a JSON file belongs{fix_hint(path)}") from None
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}){fix_hint(path)}") from None
    except json.JSONDecodeError as err:
        empty = " (empty file)" if not path.stat().st_size else ""
        raise ArtifactError(f"{path}:{err.lineno}: invalid JSON ({err.msg}){empty}{fix_hint(path)}") from None
    if model is None:
        # Issue 20: these files are JSON objects; a list or a bare value (a hand edit, another tool's file)
        # used to fail later, far from the file, as an AttributeError traceback.
        if path.name in OBJECT_FILES and not isinstance(data, dict):
            raise ArtifactError(f"{path}: expected a JSON object, found {type(data).__name__}{fix_hint(path)}")
        return data
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ArtifactError(f"{path}: {_first_error(err)}{fix_hint(path)}") from None


# Issue 20: which command rewrites a file the project reads back, so an error about it can name the fix.
WRITERS = {"trajectories.jsonl": "collect", "items.jsonl": "extract", "extract_summary.json": "extract",
           "distill.jsonl": "consolidate", "eval.json": "eval", "episodes.jsonl": "eval"}
ROUND_TOPS = ("data", "reports")
STORE_NAME = re.compile(r"^store-\d+\.md$")
OBJECT_FILES = {"eval.json", "adapter_config.json", "extract_summary.json", "train_summary.json", "headroom.json"}


def fix_hint(path: str | Path) -> str:
    """'; delete it and rerun `oel <stage> --round <r>`' for a round artifact, '' for any other file."""
    path = Path(path)
    stage = WRITERS.get(path.name) or ("consolidate" if STORE_NAME.match(path.name) else None)
    parts = path.parts[:-1]
    tops = [i for i, part in enumerate(parts[:-1]) if part in ROUND_TOPS]
    if stage is None or not tops:
        return ""
    return f"; delete it and rerun `oel {stage} --round {parts[tops[-1] + 1]}` (or dvc repro)"


def read_store(path: str | Path) -> str:
    """A knowledge store (Markdown written by consolidate): UTF-8 text without NUL bytes, or one line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}){fix_hint(path)}") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: a folder where a store file belongs{fix_hint(path)}") from None
    if "\x00" in text:
        raise ArtifactError(f"{path}: contains a NUL byte (binary junk, not a store){fix_hint(path)}")
    return text


def check_safetensors(path: str | Path) -> str | None:
    """Why a .safetensors file is unusable (cut short, junk header), or None; reads only its header."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                return f"{path.name} is cut short ({size} bytes, header needs {8 + max(n, 0)})"
            header = json.loads(fh.read(n).decode("utf-8"))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError):
        return f"{path.name} is not a safetensors file (unreadable header)"
    if 8 + n + end > size:
        return f"{path.name} is cut short ({size} of {8 + n + end} bytes)"
    return None


def write_jsonl(path: str | Path, rows: Iterable[BaseModel | dict]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            if isinstance(row, BaseModel):
                row = row.model_dump(mode="json", by_alias=True)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_jsonl(path: str | Path, model: type[M]) -> Iterator[M]:
    """Yield validated rows; the first bad line raises ArtifactError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (run the stage that writes it first)")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            yield _parse_line(path, lineno, raw, model)


def read_jsonl(path: str | Path, model: type[M]) -> list[M]:
    return list(iter_jsonl(path, model))


def _parse_line(path: Path, lineno: int, raw: bytes, model: type[M]) -> M:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start}){fix_hint(path)}") from None
    if "\x00" in text:
        raise ArtifactError(f"{path}:{lineno}: contains a NUL byte{fix_hint(path)}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (truncated last line?)" if not raw.endswith(b"\n") else ""
        raise ArtifactError(f"{path}:{lineno}: invalid JSON ({err.msg}){hint}{fix_hint(path)}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ArtifactError(f"{path}:{lineno}: {_first_error(err)}{fix_hint(path)}") from None


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(row)"
    msg = first["msg"]
    if first["type"] == "literal_error" and first["loc"][-1:] == ("schema_version",):
        msg = f"schema_version {first.get('input')!r} is not supported (expected 1)"
    return f"{loc}: {msg}"

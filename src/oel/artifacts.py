"""JSON / JSONL / text read and write: schema-validated, atomic (temp file + rename), errors as file:line."""

from __future__ import annotations

import hashlib
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


def read_json(path: str | Path, model: type[M] | type[dict] | type[list] | None = None):
    """A JSON file read back, or ArtifactError: one line naming the file (and the line, or the field) and
    the fix. `model`: a pydantic model to validate into, `dict` or `list` for the top-level shape, or None
    (any JSON; the files in OBJECT_FILES must still be objects)."""
    path = Path(path)
    try:
        data = parse_json(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (run the stage that writes it first)") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: a folder where a JSON file belongs{fix_hint(path)}") from None
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}){fix_hint(path)}") from None
    except OSError as err:
        raise ArtifactError(f"{path}: cannot be read ({err.strerror or err}){fix_hint(path)}") from None
    except json.JSONDecodeError as err:
        empty = " (empty file)" if not path.stat().st_size else ""
        raise ArtifactError(f"{path}:{err.lineno}: invalid JSON ({err.msg}){empty}{fix_hint(path)}") from None
    except ValueError as err:  # nested too deeply
        raise ArtifactError(f"{path}: {err}{fix_hint(path)}") from None
    shape = model if model in (dict, list) else dict if model is None and path.name in OBJECT_FILES else None
    if shape is not None and not isinstance(data, shape):
        # A hand edit or another tool's file would otherwise fail later, far from the file, as a traceback.
        raise ArtifactError(f"{path}: expected a JSON {_KIND[shape]}, found {_kind(data)}{fix_hint(path)}")
    if model is None or model in (dict, list):
        return data
    return _validate(model, data, str(path), path)


# Which command rewrites a file the project reads back, so an error about it can name the fix.
WRITERS = {"trajectories.jsonl": "collect", "items.jsonl": "extract", "extract_summary.json": "extract",
           "distill.jsonl": "consolidate", "eval.json": "eval", "episodes.jsonl": "eval"}
ROUND_TOPS = ("data", "reports")
STORE_NAME = re.compile(r"^store-\d+\.md$")
OBJECT_FILES = {"eval.json", "adapter_config.json", "extract_summary.json", "train_summary.json", "headroom.json",
                "provenance.json", "policy.json"}
# JSON nesting a record may have. Ours nest under ten levels; a deeper one is hostile or broken, and
# Python's json (and any code walking the record) recurses per level: 100000 levels is a RecursionError.
MAX_DEPTH = 64
_KIND = {dict: "object", list: "list"}


def _kind(data: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(data), "a number")


def parse_json(text: str | bytes) -> object:
    """json.loads, refusing nesting deeper than MAX_DEPTH with ValueError instead of a RecursionError.
    Raises json.JSONDecodeError (a ValueError) for text that is not JSON."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels (not a record this project writes)") from None
    if _too_deep(data):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels (not a record this project writes)")
    return data


def _too_deep(data: object) -> bool:
    # Iterative: a recursive walk would hit the very limit it checks.
    stack = [(data, 1)] if isinstance(data, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


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
        data = parse_json(text)
    except json.JSONDecodeError as err:
        hint = " (truncated last line?)" if not raw.endswith(b"\n") else ""
        raise ArtifactError(f"{path}:{lineno}: invalid JSON ({err.msg}){hint}{fix_hint(path)}") from None
    except ValueError as err:
        raise ArtifactError(f"{path}:{lineno}: {err}{fix_hint(path)}") from None
    return _validate(model, data, f"{path}:{lineno}", path)


def _validate(model: type[M], data: object, where: str, path: Path) -> M:
    if not isinstance(data, dict):  # a list or bare value where a record belongs: say so, not pydantic's words
        raise ArtifactError(f"{where}: expected a JSON object, found {_kind(data)}{fix_hint(path)}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ArtifactError(f"{where}: {first_error(err)}{fix_hint(path)}") from None
    except RecursionError:  # a validator walking a structure that parse_json let through
        raise ArtifactError(f"{where}: nested too deeply to validate{fix_hint(path)}") from None


def first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(row)"
    msg = first["msg"]
    if first["type"] == "literal_error" and first["loc"][-1:] == ("schema_version",):
        msg = f"schema_version {first.get('input')!r} is not supported (expected 1)"
    return f"{loc}: {msg}"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

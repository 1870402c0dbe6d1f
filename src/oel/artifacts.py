"""JSON / JSONL / text read and write: schema-validated, atomic (temp file + rename), errors as file:line."""

from __future__ import annotations

import json
import os
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
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if model is None:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ArtifactError(f"{path}: {_first_error(err)}") from None


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
        raise ArtifactError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start})") from None
    if "\x00" in text:
        raise ArtifactError(f"{path}:{lineno}: contains a NUL byte")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (truncated last line?)" if not raw.endswith(b"\n") else ""
        raise ArtifactError(f"{path}:{lineno}: invalid JSON ({err.msg}){hint}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ArtifactError(f"{path}:{lineno}: {_first_error(err)}") from None


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(row)"
    msg = first["msg"]
    if first["type"] == "literal_error" and first["loc"][-1:] == ("schema_version",):
        msg = f"schema_version {first.get('input')!r} is not supported (expected 1)"
    return f"{loc}: {msg}"

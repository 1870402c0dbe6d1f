"""Where each resolved parameter comes from: params.yaml, its profile, or the defaults in oel.config.

`oel params` prints this view. A key is `file` when params.yaml sets it and the profile does not,
`override` when params.yaml sets a key the profile also sets (the profile's value is shown beside it),
`profile` when only the profile sets it, and `default` otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oel.config import parse_params, profile_of, read_raw


@dataclass(frozen=True)
class Entry:
    key: str                 # dotted path, e.g. distill.learning_rate
    value: Any
    source: str              # file | override | profile | default
    profile_value: Any = None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested mappings as dotted keys; lists and scalars are leaves, empty mappings vanish."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resolve(raw: Any, source: str = "params") -> list[Entry]:
    """Every resolved key of a raw params mapping with its source, in the order of the typed params."""
    params = parse_params(raw, source)  # validates first: a bad file never gets a partial view
    raw = raw or {}
    written, preset = flatten(raw), flatten(profile_of(raw, source))
    entries = []
    for key, value in flatten(params.model_dump(mode="json", by_alias=True)).items():
        if key in written:
            how = "override" if key in preset else "file"
        else:
            how = "profile" if key in preset else "default"
        entries.append(Entry(key, value, how, preset.get(key) if how == "override" else None))
    return entries


def resolve_file(path: str | Path) -> tuple[str, list[Entry]]:
    """(profile name, entries) of a params file."""
    raw = read_raw(path)
    entries = resolve(raw, str(path))
    return next(e.value for e in entries if e.key == "profile"), entries


def render(path: str | Path, profile: str, entries: list[Entry]) -> str:
    """A table a person reads: key, value, source (an override shows the profile value it replaced)."""
    width = max(len(e.key) for e in entries)
    lines = [f"# {path}: every resolved parameter (profile {profile}); source: file | override | profile | default"]
    for e in entries:
        note = f"  (profile: {_show(e.profile_value)})" if e.source == "override" else ""
        lines.append(f"{e.key:<{width}}  {_show(e.value):<28}  {e.source}{note}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return json.dumps(value)  # one spelling for every type: "text", 1e-06, true, null, [6, 6]

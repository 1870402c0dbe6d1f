"""Round planning for `oel-iteration`: which round runs next, declaring it, one iteration at a time.

A round is done when its eval breakdown exists (reports/<r>/eval.json, eval's last write). The next iteration runs the
first declared round that is not done; when every declared round is done it declares `r<N+1>: {from: P}`
in params.yaml (comments and layout kept) and runs that. P is the promotion gate's champion
(oel.rounds.lifecycle; `promotion.policy: always`: r<N>), or what `start_from` names (a round, base or an alias),
always written as a round id so DVC's graph stays explicit. Whether a done round is *stale* is
DVC's business: each stage's `dvc repro` re-runs whatever changed upstream.

Two iterations in one project would both pick the same round and race on params.yaml and DVC's own
lock, so planning and running hold a per-project file lock; the second waits `timeout` seconds, then
fails with one line naming the holder.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from oel.config import load_params
from oel.errors import UserError
from oel.paths import ProjectPaths
from oel.rounds.ids import RoundError, next_round_id, round_number  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT = 30.0


class IterationBusy(UserError, RuntimeError):
    """Another iteration holds the project lock."""


@dataclass(frozen=True)
class RoundPlan:
    round_id: str
    start_from: str
    declared_now: bool  # True when this iteration added the round to params.yaml


def iteration_lock_path(root: str | Path) -> Path:
    # Beside RoundPaths.lock (data/.<round>.lock): gitignored, and no DVC out contains it.
    return Path(root) / "data" / ".iteration.lock"


def is_done(root: str | Path, round_id: str) -> bool:
    return ProjectPaths(Path(root)).round(round_id).details.is_file()


def plan(params_file: str | Path, round_id: str | None = None, start_from: str | None = None) -> RoundPlan:
    """Decide the round this iteration runs; declares it in params.yaml when it is the next one.

    start_from: the policy a newly declared round starts from (a round id, base, `champion`, `challenger`);
    default: the gate's champion. Every check runs before params.yaml is touched."""
    from oel.rounds import lifecycle

    params_file = Path(params_file)
    root = params_file.parent
    params = load_params(params_file)
    declared = list(params.rounds)
    if round_id is None:
        round_id = next((r for r in declared if not is_done(root, r)), None) or next_round_id(declared)
    if round_id in declared:
        if start_from is not None and lifecycle.resolve(start_from, params, root) != params.policy_of(round_id):
            raise RoundError(f"round {round_id} is already declared from {params.policy_of(round_id)} in "
                             f"{params_file}; drop --from, or edit rounds.{round_id}.from there")
        return RoundPlan(round_id, params.policy_of(round_id), declared_now=False)
    expected = next_round_id(declared)
    if round_id != expected:
        raise RoundError(f"round {round_id!r} is neither declared nor the next round; "
                         f"pass one of {', '.join(declared)} or {expected}")
    start_from = lifecycle.resolve(start_from, params, root) if start_from else lifecycle.next_parent(params, root)
    declare_round(params_file, round_id, start_from)
    return RoundPlan(round_id, start_from, declared_now=True)


def _round_trip():
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip mode: comments, key order and quoting survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines the user wrote
    # ruamel writes None as an empty value; keep the file's explicit `null`.
    yaml.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def declare_log_hash(params_file: str | Path, round_id: str, sha256: str) -> None:
    """Set rounds.<round_id>.collect.sha256 (a round on a chat log), keeping comments and layout; a file that
    already says so is left untouched."""
    params_file = Path(params_file)
    yaml = _round_trip()
    data = yaml.load(params_file.read_text(encoding="utf-8"))
    collect = data["rounds"][round_id]["collect"]  # load_params checked the round is on a chat log
    if collect.get("sha256") == sha256:
        return
    collect["sha256"] = sha256
    _atomic_dump(yaml, data, params_file)
    load_params(params_file)
    log.info("rounds.%s.collect.sha256: %s in %s", round_id, sha256, params_file)


def declare_round(params_file: str | Path, round_id: str, start_from: str) -> None:
    """Append `round_id: {from: start_from}` to params.yaml `rounds`, keeping comments and layout."""
    from ruamel.yaml.comments import CommentedMap

    params_file = Path(params_file)
    yaml = _round_trip()
    data = yaml.load(params_file.read_text(encoding="utf-8"))
    rounds = data.get("rounds")
    if not isinstance(rounds, dict):
        raise RoundError(f"{params_file}: no `rounds:` mapping to add {round_id} to; add rounds: {{r1: {{from: base}}}}")
    if round_id in rounds:
        raise RoundError(f"{params_file}: round {round_id} is already declared")
    rounds[round_id] = _like_last(rounds, CommentedMap([("from", start_from)]))
    _atomic_dump(yaml, data, params_file)
    load_params(params_file)  # the written file must still validate; raises one line if not
    log.info("declared round %s (from %s) in %s", round_id, start_from, params_file)


def _like_last(rounds, new):
    """Give the new round the previous one's style, and move the blank line/comment that ruamel
    attached to the previous round's last value below the new round, where it separated sections."""
    prev = rounds[next(reversed(rounds))]
    if not hasattr(prev, "ca"):
        return new
    if prev.fa.flow_style():
        new.fa.set_flow_style()
    last = next(reversed(prev), None)
    slot = prev.ca.items.get(last)
    token = slot[2] if slot and len(slot) > 2 else None
    if token is None or not isinstance(getattr(token, "value", None), str):
        return new
    # An inline comment (`from: base  # note`) stays; the lines after it move with the section gap.
    if token.value.startswith("\n"):
        new.ca.items["from"] = prev.ca.items.pop(last)
        return new
    inline, _, below = token.value.partition("\n")
    if below:
        moved = copy.copy(token)
        moved.value = "\n" + below
        new.ca.items["from"] = [None, None, moved, None]
        token.value = inline + "\n"
    return new


def _atomic_dump(yaml, data, path: Path) -> None:
    from oel.artifacts import atomic_open

    mode = path.stat().st_mode & 0o777
    with atomic_open(path) as fh:
        yaml.dump(data, fh)
    os.chmod(path, mode)


@contextmanager
def iteration_lock(root: str | Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[Path]:
    """Hold the project's iteration lock; wait up to `timeout` s, then raise IterationBusy.

    An OS-level lock (filelock): it dies with its process, so a killed iteration never leaves a stale lock.
    """
    from filelock import FileLock, Timeout

    path = iteration_lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except IsADirectoryError:
        # A folder (or another non-file) at the lock's path: one line, not an OSError traceback.
        raise RoundError(f"{path}: a folder where the iteration lock file belongs; delete it and rerun") from None
    except Timeout:
        raise IterationBusy(f"another oel iteration is running in {Path(root).resolve()} "
                            f"({_holder(path)}); waited {timeout:g}s. Let it finish, or raise "
                            f"lock_timeout") from None
    try:
        _write_holder(path)
        yield path
    finally:
        lock.release()


def _holder_file(lock: Path) -> Path:
    return lock.with_name(lock.name + ".holder")


def _write_holder(lock: Path) -> None:
    _holder_file(lock).write_text(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n", encoding="utf-8")


def _holder(lock: Path) -> str:
    try:
        return _holder_file(lock).read_text(encoding="utf-8").strip()[:200]
    except (OSError, UnicodeDecodeError):  # gone, or damaged: the holder line is only a hint
        return "holder unknown"


__all__ = ["RoundPlan", "RoundError", "IterationBusy", "plan", "declare_round", "iteration_lock",
           "next_round_id", "is_done", "round_number", "iteration_lock_path"]

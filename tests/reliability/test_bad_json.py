"""JSON input of any shape or nesting depth through the real commands (`oel ...` in a subprocess): a log
line nested 100000 deep (a RecursionError in Python's json), a list where a record belongs, a wrong-typed
field. Each is exit 2 with exactly one `error: FILE:LINE: ...` line per bad record, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.conftest import make_project, oel, one_error_line, reliability_raw, tree_hashes

DEEP = "[" * 100_000 + "]" * 100_000
CONV = {"messages": [{"role": "user", "content": "How far is 10 miles in km?"},
                     {"role": "assistant", "content": "About 16 km."}, {"role": "user", "content": "Thanks"}]}
TOPS = ("data", "models", "reports", "chatlogs")


@pytest.fixture
def proj(tmp_path) -> Path:
    """r1 learns from a chat log (chatlogs/week1.jsonl); nothing built yet."""
    raw = reliability_raw(rounds={"r1": {"from": "base", "collect": {"source": "chatlog",
                                                                      "chatlog": "chatlogs/week1.jsonl"}}})
    return make_project(tmp_path / "p", raw)


def lines(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


BAD_LOGS = {  # case -> (second line of the log, what its error line says)
    "nested 100000 deep": (DEEP, "nested deeper than 64 levels"),
    "a field nested 100000 deep": ('{"messages": ' + "[" * 100_000, "nested deeper than 64 levels"),
    "a list": (json.dumps([CONV]), "expected a JSON object with `messages`, found list"),
    "a wrong-typed field": (json.dumps({**CONV, "id": [1]}), "`id` must be a non-empty string or number"),
}


@pytest.mark.parametrize("case", list(BAD_LOGS))
@pytest.mark.parametrize("command", ["import-trajectories", "log-round"])
def test_bad_log_is_one_line_per_record_and_nothing_written(proj, case, command):
    second, what = BAD_LOGS[case]
    log = proj / "export.jsonl"
    log.write_text(lines(CONV, second, CONV))
    before = tree_hashes(proj, *TOPS)
    line = one_error_line(oel(proj, command, str(log), "--round", "r1"), f"export.jsonl:2: {what}")
    assert line.startswith("error: ") and not (proj / "chatlogs").exists()
    assert tree_hashes(proj, *TOPS) == before and not (proj / "dvc.lock").exists()  # dvc repro never ran


@pytest.mark.parametrize("case", list(BAD_LOGS))
def test_collect_of_a_round_on_a_bad_log_is_one_line(proj, case):
    second, what = BAD_LOGS[case]
    (proj / "chatlogs").mkdir()
    (proj / "chatlogs" / "week1.jsonl").write_text(lines(CONV, second))
    before = tree_hashes(proj, *TOPS)
    one_error_line(oel(proj, "collect", "--round", "r1", "--params", "params.yaml"),
                   f"chatlogs/week1.jsonl:2: {what}", strict=False)
    assert tree_hashes(proj, *TOPS) == before and not (proj / "data").exists()


TRAJECTORY_ROWS = {  # `--format oel`: a trajectory row per line, read by the artifact reader
    "nested 100000 deep": (DEEP, ":1: nested deeper than 64 levels"),
    "a list": ("[1, 2]", ":1: expected a JSON object, found a list"),
    "a wrong-typed field": (json.dumps({"schema_version": 1, "episode_id": "e", "game": "frozenlake", "seed": "x"}),
                            ":1: seed: Input should be a valid integer"),
}


@pytest.mark.parametrize("case", list(TRAJECTORY_ROWS))
def test_bad_trajectory_rows_are_one_line(proj, case):
    row, what = TRAJECTORY_ROWS[case]
    log = proj / "rows.jsonl"
    log.write_text(lines(row))
    one_error_line(oel(proj, "import-trajectories", str(log), "--round", "r1", "--format", "oel"),
                   f"rows.jsonl{what}")
    assert not (proj / "chatlogs").exists()

import json

import pytest

from oel.artifacts import ArtifactError, atomic_open, read_json, read_jsonl, write_json, write_jsonl
from oel.schemas import Episode, Message, Turn


def _episode(i: int = 0) -> Episode:
    turn = Turn(index=0, prompt=[Message(role="user", content="board")], response="[up]", action="up",
                valid=True, observation="You moved up.", response_tokens=3)
    return Episode(episode_id=f"frozenlake-{i}", game="frozenlake", seed=i, split="user", round="r1",
                   policy="base", turns=[turn], success=False, reward=0.0, feedback="Failure: fell in a hole")


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "t.jsonl"
    assert write_jsonl(path, [_episode(0), _episode(1)]) == 2
    assert read_jsonl(path, Episode) == [_episode(0), _episode(1)]


def test_truncated_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [_episode(0), _episode(1)])
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ArtifactError, match=r"t.jsonl:2: invalid JSON .*truncated"):
        read_jsonl(path, Episode)


def test_wrong_schema_version_and_non_utf8(tmp_path):
    row = _episode().model_dump(mode="json")
    row["schema_version"] = 7
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ArtifactError, match=r"v.jsonl:1: schema_version: schema_version 7 is not supported"):
        read_jsonl(path, Episode)
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(ArtifactError, match=r"v.jsonl:1: not UTF-8"):
        read_jsonl(path, Episode)


def test_nul_byte_and_oversized_field_are_refused(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps(_episode().model_dump(mode="json")).replace("board", "bo\\u0000ard") + "\n")
    path.write_bytes(path.read_bytes().replace(b"\\u0000", b"\x00"))
    with pytest.raises(ArtifactError, match="NUL"):
        read_jsonl(path, Episode)
    row = _episode().model_dump(mode="json")
    row["feedback"] = "x" * 300_000
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ArtifactError, match="n.jsonl:1: feedback"):
        read_jsonl(path, Episode)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"ok": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path) as fh:
            fh.write('{"half": ')
            raise RuntimeError("killed")
    assert read_json(path) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        read_jsonl(tmp_path / "none.jsonl", Episode)

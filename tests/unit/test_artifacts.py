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


# ---- any shape and nesting depth read back is one line, never a traceback -----------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads alone raises RecursionError on this


def test_deep_nesting_is_one_line_naming_file_and_line(tmp_path):
    good = json.dumps(_episode().model_dump(mode="json")).encode()
    path = tmp_path / "t.jsonl"
    path.write_bytes(good + b"\n" + DEEP + b"\n")
    with pytest.raises(ArtifactError) as err:
        read_jsonl(path, Episode)
    assert str(err.value) == f"{path}:2: nested deeper than 64 levels (not a record this project writes)"
    whole = tmp_path / "eval.json"
    whole.write_bytes(b'{"heldout": ' + b'{"a": ' * 100_000)  # unclosed as well as deep
    with pytest.raises(ArtifactError, match=r"eval\.json: nested deeper than 64 levels"):
        read_json(whole)


def test_nesting_up_to_the_limit_is_read(tmp_path):
    from oel.artifacts import MAX_DEPTH, parse_json

    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    with pytest.raises(ValueError, match="nested deeper"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    wide = {"k": [{"a": [1, 2, {"b": "x"}]} for _ in range(1000)]}  # wide is fine, only depth counts
    assert parse_json(json.dumps(wide)) == wide


@pytest.mark.parametrize("content, found", [(b"[1, 2]", "a list"), (b'"text"', "a string"), (b"7", "a number"),
                                            (b"null", "null"), (b"true", "true/false")])
def test_a_record_of_the_wrong_shape_is_one_line(tmp_path, content, found):
    from oel.schemas import PolicyManifest

    path = tmp_path / "policy.json"
    path.write_bytes(content)
    with pytest.raises(ArtifactError) as err:
        read_json(path, PolicyManifest)
    assert str(err.value) == f"{path}: expected a JSON object, found {found}"
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(content + b"\n")
    with pytest.raises(ArtifactError, match=rf"rows\.jsonl:1: expected a JSON object, found {found}$"):
        read_jsonl(rows, Episode)


def test_read_json_checks_the_top_level_shape_it_is_asked_for(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text('[{"step": 0}]')
    assert read_json(path, list) == [{"step": 0}]
    with pytest.raises(ArtifactError, match=r"curve\.json: expected a JSON object, found a list"):
        read_json(path, dict)
    path.write_text('{"step": 0}')
    with pytest.raises(ArtifactError, match=r"curve\.json: expected a JSON list, found an object"):
        read_json(path, list)
    assert read_json(path) == {"step": 0}  # no shape asked: any JSON (files in OBJECT_FILES excepted)


def test_a_wrong_typed_field_names_the_field(tmp_path):
    from oel.schemas import PolicyManifest

    path = tmp_path / "policy.json"
    path.write_text('{"schema_version": 1, "merged": "very"}')
    with pytest.raises(ArtifactError, match=r"policy\.json: merged: Input should be a valid boolean"):
        read_json(path, PolicyManifest)


def test_any_json_of_any_shape_reads_back_as_a_record_or_one_line(tmp_path):
    """Seeded random JSON values (every type, nesting 1-200 deep) as trajectory rows: each line is either a
    valid Episode or one ArtifactError line naming file:line -- never another exception."""
    import random

    rng = random.Random(20)

    def value(depth: int):
        kind = rng.choice(["dict", "list", "str", "int", "float", "bool", "null"] if depth > 0 else ["str", "int"])
        if kind == "dict":
            keys = rng.sample(["turns", "seed", "split", "episode_id", "x", "game", "prompt"], rng.randint(0, 3))
            return {k: value(depth - 1) for k in keys}
        if kind == "list":
            return [value(depth - 1) for _ in range(rng.randint(0, 2))]
        return {"str": "s", "int": 3, "float": 0.5, "bool": True, "null": None}[kind]

    good = _episode().model_dump(mode="json")
    path = tmp_path / "fuzz.jsonl"
    for i in range(300):
        row = value(rng.choice([1, 3, 8, 200])) if i % 3 else {**good, rng.choice(list(good)): value(rng.randint(1, 90))}
        path.write_text(json.dumps(row) + "\n")
        try:
            read_jsonl(path, Episode)
        except ArtifactError as err:
            assert str(err).startswith(f"{path}:1: ") and "\n" not in str(err)

"""Bad input through the real user path (`oel ...` in a subprocess): every case gives exactly one stderr line
`error: ...` naming the cause, exit status 2, and leaves every existing artifact byte-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.reliability.conftest import (
    ARTIFACT_TOPS,
    Reference,
    oel,
    one_error_line,
    tree_hashes,
)

R1 = Path("data/r1")


@pytest.fixture
def done(reference: Reference, tmp_path) -> Path:
    """A project holding a whole finished round (copied from the reference run)."""
    root = tmp_path / "p"
    shutil.copytree(reference.root, root, symlinks=True)
    return root


def run_unchanged(root: Path, *args: str, strict: bool = True) -> str:
    """Run a failing command; assert its one error line and that no artifact changed. Returns the line."""
    before = tree_hashes(root, *ARTIFACT_TOPS)
    assert before
    proc = oel(root, *args)
    line = one_error_line(proc, strict=strict)
    assert tree_hashes(root, *ARTIFACT_TOPS) == before, "a failing command changed an existing artifact"
    return line


def bad_params(root: Path, mutate) -> str:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    mutate(raw)
    (root / "bad.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "bad.yaml"


def _set(path: str, value):
    def mutate(raw):
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return mutate


PARAMS_CASES = {
    "unknown key": (_set("distill.stepz", 3), ["distill.stepz", "unknown key"]),
    "wrong type": (_set("collect.episodes_per_game", "many"), ["collect.episodes_per_game"]),
    "budget below one item": (_set("extract.max_knowledge_tokens", 8), ["max_knowledge_tokens=8", "smaller than one item"]),
    "zero episodes": (_set("collect.episodes_per_game", 0), ["collect.episodes_per_game", "greater than 0"]),
    "round cycle": (_set("rounds", {"r1": {"from": "r2"}, "r2": {"from": "r1"}}), ["rounds.r1.from", "cycle"]),
    "missing parent": (_set("rounds", {"r1": {"from": "r7"}}), ["rounds.r1.from", "undeclared round"]),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
@pytest.mark.parametrize("command", ["collect", "distill"])
def test_bad_params_one_line_and_nothing_overwritten(done, case, command):
    mutate, needles = PARAMS_CASES[case]
    line = run_unchanged(done, command, "--round", "r1", "--params", bad_params(done, mutate))
    assert line.startswith("error: bad.yaml: ")
    for needle in needles:
        assert needle in line, line


MODEL_CASES = {"missing folder": (None, "no such folder"),
               "config.json cut short": ('{"truncated": ', "could not be loaded"),
               "config.json binary junk": ("\x00\x01 not json", "could not be loaded"),
               "no config.json": ("", "has no config.json")}


def _model_folder(root: Path, case: str) -> str:
    content, _ = MODEL_CASES[case]
    if content is not None:
        folder = root / "broken-model"
        folder.mkdir()
        if content:
            (folder / "config.json").write_text(content)
    return "./broken-model"


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_folder_in_base_keeps_the_good_manifest(done, case):
    # models/base/policy.json (what every round-1 stage loads) must not be replaced by a broken spec.
    params_file = bad_params(done, _set("model.name", _model_folder(done, case)))
    line = run_unchanged(done, "base", "--params", params_file)
    assert "broken-model" in line and MODEL_CASES[case][1] in line, line


@pytest.mark.parametrize("case", ["missing folder", "config.json cut short"])
def test_bad_model_folder_in_collect(done, case):
    shutil.rmtree(done / "models")  # no base manifest: collect loads params.model itself
    params_file = bad_params(done, _set("model.name", _model_folder(done, case)))
    line = run_unchanged(done, "collect", "--round", "r1", "--params", params_file)
    assert "broken-model" in line and MODEL_CASES[case][1] in line, line


def _rewrite_trajectories(root: Path, edit) -> None:
    path = root / R1 / "trajectories.jsonl"
    path.write_bytes(edit(path.read_bytes()))


TRAJECTORY_CASES = {
    "truncated last line": (lambda b: b[:-25], "trajectories.jsonl:{last}: invalid JSON", "truncated last line?"),
    "wrong schema version": (lambda b: b.replace(b'"schema_version": 1', b'"schema_version": 7', 1),
                             "trajectories.jsonl:1: schema_version", "7 is not supported (expected 1)"),
    "non-UTF-8 bytes": (lambda b: b.replace(b'"game"', b'"g\xff\xfeame"', 1), "trajectories.jsonl:1: not UTF-8", ""),
}


@pytest.mark.parametrize("case", list(TRAJECTORY_CASES))
@pytest.mark.parametrize("command", ["extract", "consolidate"])
def test_bad_trajectories_one_line_file_line_and_nothing_else_overwritten(done, case, command):
    edit, where, what = TRAJECTORY_CASES[case]
    _rewrite_trajectories(done, edit)
    last = len((done / R1 / "trajectories.jsonl").read_bytes().splitlines())
    line = run_unchanged(done, command, "--round", "r1", "--params", "params.yaml")
    assert where.format(last=last) in line and what in line, line


def test_import_refuses_oversized_fields_and_keeps_the_round(done):
    rows = [json.loads(x) for x in (done / R1 / "trajectories.jsonl").read_text().splitlines()]
    rows[1]["turns"][0]["response"] = "A" * 300_000  # over the schema's 200k-character bound
    log = done / "deploy.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    on_log = bad_params(done, _set("rounds.r1.collect", {"source": "chatlog", "chatlog": "chatlogs/r1.jsonl"}))
    line = run_unchanged(done, "import-trajectories", str(log), "--round", "r1", "--params", on_log)
    assert "deploy.jsonl:2: turns.0.response" in line and "at most 200000 characters" in line
    assert not (done / "chatlogs").exists()


def test_corrupt_cached_textworld_game_is_regenerated_by_collect(done, tmp_path):
    from oel.config import load_params
    from oel.games.twmake import challenge_for_seed, game_dir, story_damage
    from oel.stages.collect import collect_specs

    params_file = bad_params(done, lambda raw: raw["games"].update(
        frozenlake={"enabled": False}, sokoban={"enabled": False},
        textworld={**raw["games"]["textworld"], "enabled": True}))
    params = load_params(done / params_file)
    seed = collect_specs(params, "r1")[0].seed
    tw = params.games.textworld
    game = game_dir(done / ".cache" / "textworld", challenge_for_seed(seed, tw.challenges), tw.level, seed)
    game.mkdir(parents=True)
    (game / "game.z8").write_bytes(b"\x05" + b"garbage" * 40)  # a cached file cut/corrupted on disk
    # The game cache is rebuildable from the seed (issue 20): one log line, then the stage goes on.
    proc = oel(done, "collect", "--round", "r1", "--params", params_file)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("cached TextWorld game is damaged") == 1 and "regenerating it" in proc.stderr
    assert story_damage(game / "game.z8") is None
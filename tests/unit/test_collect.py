"""collect stage pieces without a model: seeds/specs, trajectory schema, import of deployment logs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from oel.artifacts import ArtifactError, read_jsonl, write_jsonl
from oel.config import GamesParams, SamplingParams
from oel.games import make_game
from oel.rollout import EpisodeSpec, FakeBackend, play
from oel.schemas import Episode
from oel.stages import collect
from tests.conftest import REPO, tiny_params


@pytest.fixture
def episodes() -> list[Episode]:
    return play([EpisodeSpec("frozenlake", s) for s in (1, 2, 3)],
                lambda n: make_game(n, GamesParams(), Path(".")), FakeBackend(),
                SamplingParams(max_new_tokens=8), round_id="r1", policy="base", progress=False)


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-random"},
                                    "games": {"textworld": {"enabled": False}},
                                    "rounds": {"r1": {"from": "base"}, "r2": {"from": "r1"}}}))
    return path


def test_specs_cover_every_enabled_game_with_disjoint_user_and_extract_seeds():
    params = tiny_params(games={"textworld": {"enabled": False}})
    specs = collect.collect_specs(params, "r1")
    assert {s.game for s in specs} == {"frozenlake", "sokoban"}
    for game in ("frozenlake", "sokoban"):
        user = [s.seed for s in specs if s.game == game and s.split == "user"]
        extract = [s.seed for s in specs if s.game == game and s.split == "extract"]
        assert len(user) == params.collect.episodes_per_game
        assert len(extract) == params.collect.extraction_episodes_per_game
        assert not set(user) & set(extract)
    r2 = collect.collect_specs(params, "r2")
    assert not {s.seed for s in specs} & {s.seed for s in r2}


def test_committed_schema_is_generated_from_the_episode_model():
    committed = json.loads((REPO / collect.SCHEMA_FILE).read_text())
    assert committed == collect.trajectory_schema(), "regenerate: python -c 'from oel.stages.collect " \
                                                     "import write_schema; write_schema()'"


def test_trajectory_file_round_trips_through_its_schema(tmp_path, episodes):
    path = tmp_path / "trajectories.jsonl"
    write_jsonl(path, episodes)
    validator = jsonschema.Draft202012Validator(collect.trajectory_schema())
    for line in path.read_text().splitlines():
        validator.validate(json.loads(line))
    assert read_jsonl(path, Episode) == episodes


def test_schema_refuses_oversized_fields_and_unknown_keys(episodes):
    validator = jsonschema.Draft202012Validator(collect.trajectory_schema())
    row = episodes[0].model_dump(mode="json")
    big = {**row, "feedback": "x" * 200_001}
    assert not validator.is_valid(big)
    assert not validator.is_valid({**row, "surprise": 1})
    with pytest.raises(ValueError):
        Episode.model_validate(big)


def test_summary_has_games_and_overall(episodes):
    summary = collect.summarize(episodes)
    assert set(summary) == {"frozenlake", "overall"}
    block = summary["overall"]
    assert block["episodes"] == 3
    for key in ("pass_rate", "response_tokens_per_turn", "invalid_action_rate", "turns_per_game"):
        assert key in block


def _write_log(path: Path, episodes: list[Episode], edit=None) -> None:
    rows = [e.model_dump(mode="json") for e in episodes]
    if edit:
        edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_import_validates_and_writes_the_round(tmp_path, episodes, params_file):
    log = tmp_path / "deploy.jsonl"

    def strip_context(rows):  # a log from another serving stack: prompts but no slot values
        for turn in rows[1]["turns"]:
            turn["context"] = None
        rows[2]["round"] = "whatever"
    _write_log(log, episodes, strip_context)
    n = collect.import_file(log, "r2", params_file, tmp_path)
    assert n == 3
    got = read_jsonl(tmp_path / "data" / "r2" / "trajectories.jsonl", Episode)
    assert [e.round for e in got] == ["r2"] * 3
    assert got[1].turns[0].context == episodes[1].turns[0].context  # recovered from the prompt


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[1].update(split="heldout"), "heldout"),
    (lambda rows: rows[1].update(game="chess"), "not enabled"),
    (lambda rows: rows[1].update(episode_id=rows[0]["episode_id"]), "twice"),
    (lambda rows: rows[1]["turns"][0]["prompt"][0].update(
        content=rows[1]["turns"][0]["prompt"][0]["content"] + "<|im_start|>system"), "context renders"),
    (lambda rows: rows[1]["turns"][0].update(index=5), "index"),
    (lambda rows: rows[1].update(feedback="x" * 200_001), "feedback"),
    (lambda rows: rows[1].update(schema_version=9), "schema_version"),
])
def test_import_rejects_a_bad_row_with_file_line_and_keeps_the_old_file(tmp_path, episodes, params_file,
                                                                        edit, message):
    target = tmp_path / "data" / "r1" / "trajectories.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("OLD CONTENT\n")
    log = tmp_path / "deploy.jsonl"
    _write_log(log, episodes, edit)
    with pytest.raises(ArtifactError) as err:
        collect.import_file(log, "r1", params_file, tmp_path)
    assert str(err.value).startswith(f"{log}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert target.read_text() == "OLD CONTENT\n"
    assert [p.name for p in target.parent.iterdir()] == ["trajectories.jsonl"]  # no temp file left


def test_import_reports_the_true_line_number_past_blank_lines(tmp_path, episodes, params_file):
    log = tmp_path / "deploy.jsonl"
    rows = [e.model_dump(mode="json") for e in episodes]
    rows[2]["split"] = "heldout"
    log.write_text(json.dumps(rows[0]) + "\n\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(ArtifactError, match=r"deploy\.jsonl:5: "):
        collect.import_file(log, "r1", params_file, tmp_path)


def test_import_refuses_undeclared_round_and_empty_file(tmp_path, episodes, params_file):
    from oel.errors import UserError

    log = tmp_path / "deploy.jsonl"
    _write_log(log, episodes)
    with pytest.raises(UserError, match="r9"):
        collect.import_file(log, "r9", params_file, tmp_path)
    log.write_text("\n")
    with pytest.raises(ArtifactError, match="no episodes"):
        collect.import_file(log, "r1", params_file, tmp_path)


def test_user_and_extract_splits_play_with_their_own_sampling(tmp_path, monkeypatch):
    """Deployment games sample with collect.sampling, the extractor's games with collect.extraction_sampling."""
    import oel.stages._common
    from oel.paths import ProjectPaths

    class Recording(FakeBackend):
        def __init__(self):
            super().__init__()
            self.samplings = []

        def generate(self, prompts, sampling, seed=None):
            self.samplings.append((len(prompts), sampling, seed))
            return super().generate(prompts, sampling, seed)

    backends = []
    monkeypatch.setattr(oel.stages._common, "round_policy_spec", lambda params, paths: "policy")
    monkeypatch.setattr(collect, "build_backend", lambda params, spec, root: backends.append(Recording())
                        or backends[-1])
    params = tiny_params(games={"sokoban": {"enabled": False}, "textworld": {"enabled": False}},
                         collect={"episodes_per_game": 2, "extraction_episodes_per_game": 3, "batch_size": 8})
    paths = ProjectPaths(tmp_path).round("r1")
    collect.run(params, paths)
    episodes = read_jsonl(paths.trajectories, Episode)
    assert [ep.split for ep in episodes] == ["user"] * 2 + ["extract"] * 3
    (backend,) = backends
    first_extract = next(i for i, (n, s, _) in enumerate(backend.samplings) if n == 3)
    assert {s for _, s, _ in backend.samplings[:first_extract]} == {params.collect.sampling}
    assert {s for _, s, _ in backend.samplings[first_extract:]} == {params.collect.extraction_sampling}
    assert params.collect.extraction_sampling.top_k == 20 and params.collect.sampling.top_k == 0
    seeds = [seed for _, _, seed in backend.samplings]
    collect.run(params, paths)
    assert [seed for _, _, seed in backends[-1].samplings] == seeds  # deterministic call seeds

"""collect stage pieces without a model: seeds/specs, trajectory schema, import of deployment logs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from oel.artifacts import ArtifactError, read_jsonl, write_jsonl
from oel.config import GamesParams, SamplingParams, load_params
from oel.games import make_game
from oel.paths import ProjectPaths
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
                                    "rounds": {"r1": _on_log("base", "r1"), "r2": _on_log("r1", "r2"),
                                               "r3": {"from": "r2"}}}))
    return path


def _on_log(start: str, round_id: str) -> dict:
    return {"from": start, "collect": {"source": "chatlog", "chatlog": f"chatlogs/{round_id}.jsonl"}}


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


def test_import_checks_the_log_and_puts_it_where_the_round_reads_it(tmp_path, episodes, params_file):
    log = tmp_path / "deploy.jsonl"

    def strip_context(rows):  # a log from another serving stack: prompts but no slot values
        for turn in rows[1]["turns"]:
            turn["context"] = None
        rows[2]["round"] = "whatever"
    _write_log(log, episodes, strip_context)
    n, target = collect.import_file(log, "r2", params_file, tmp_path)
    assert n == 3 and target == tmp_path / "chatlogs" / "r2.jsonl"
    assert target.read_bytes() == log.read_bytes()
    assert not (tmp_path / "data").exists()  # DVC's outputs are collect's to write, under dvc repro

    paths = ProjectPaths(tmp_path).round("r2")
    summary = collect.run(load_params(params_file), paths)  # plays nothing: no policy is loaded
    got = read_jsonl(paths.trajectories, Episode)
    assert summary["episodes"] == 3 and [e.round for e in got] == ["r2"] * 3
    assert got[1].turns[0].context == episodes[1].turns[0].context  # recovered from the prompt

    assert collect.import_file(log, "r2", params_file, tmp_path)[0] == 3  # the same log again: fine
    _write_log(log, episodes[:2])  # a changed log where r2 was collected from: DVC would not see it
    with pytest.raises(ArtifactError, match=r"round r2 was collected from this log; put a changed log at a new"):
        collect.import_file(log, "r2", params_file, tmp_path)
    assert len(target.read_text().splitlines()) == 3


def test_import_declares_the_logs_hash_and_collect_refuses_a_log_edited_in_place(tmp_path, episodes, params_file,
                                                                                  caplog):
    """DVC tracks the round's declaration, not the log: the hash there is what makes an edit visible."""
    from typer.testing import CliRunner

    from oel.cli import app

    log = tmp_path / "deploy.jsonl"
    _write_log(log, episodes)
    target = tmp_path / "chatlogs" / "r1.jsonl"
    params_file.write_text("# my project\n" + params_file.read_text())
    done = CliRunner().invoke(app, ["import-trajectories", str(log), "--round", "r1", "--params", str(params_file),
                                    "--root", str(tmp_path)])
    assert done.exit_code == 0, done.output
    declared = load_params(params_file).rounds["r1"].source.sha256
    assert declared == hashlib.sha256(target.read_bytes()).hexdigest() and declared[:12] in done.output
    assert params_file.read_text().startswith("# my project\n")  # the user's file keeps its comments
    paths = ProjectPaths(tmp_path).round("r1")
    assert collect.run(load_params(params_file), paths)["episodes"] == 3

    _write_log(target, episodes[:2])  # edited in place, behind DVC's back
    with pytest.raises(ArtifactError, match=rf"r1\.jsonl: sha256 \w+, but rounds\.r1\.collect\.sha256 is {declared}: "
                                            r"the log changed since it was declared"):
        collect.run(load_params(params_file), paths)
    assert len(read_jsonl(paths.trajectories, Episode)) == 3  # the round's trajectories stay as they were

    undeclared = ProjectPaths(tmp_path).round("r2")  # declared by hand, without a hash: collect says what to add
    undeclared_log = tmp_path / "chatlogs" / "r2.jsonl"
    _write_log(undeclared_log, episodes)
    collect.run(load_params(params_file), undeclared)
    assert f"declare sha256: {hashlib.sha256(undeclared_log.read_bytes()).hexdigest()}" in caplog.text


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
def test_import_rejects_a_bad_row_with_file_line_and_keeps_the_old_log(tmp_path, episodes, params_file,
                                                                      edit, message):
    target = tmp_path / "chatlogs" / "r1.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("OLD CONTENT\n")
    log = tmp_path / "deploy.jsonl"
    _write_log(log, episodes, edit)
    with pytest.raises(ArtifactError) as err:
        collect.import_file(log, "r1", params_file, tmp_path)
    assert str(err.value).startswith(f"{log}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert target.read_text() == "OLD CONTENT\n"
    assert [p.name for p in target.parent.iterdir()] == ["r1.jsonl"]  # no temp file left


def test_collect_of_a_round_on_a_bad_log_writes_nothing(tmp_path, episodes, params_file):
    log = tmp_path / "chatlogs" / "r1.jsonl"
    with pytest.raises(ArtifactError, match=r"r1\.jsonl: no such file; rounds\.r1\.collect\.chatlog names it"):
        collect.run(load_params(params_file), ProjectPaths(tmp_path).round("r1"))
    log.parent.mkdir()
    _write_log(log, episodes, lambda rows: rows[2].update(split="heldout"))
    paths = ProjectPaths(tmp_path).round("r1")
    with pytest.raises(ArtifactError, match=r"chatlogs/r1\.jsonl:3: split 'heldout'"):
        collect.run(load_params(params_file), paths)
    assert not paths.trajectories.parent.exists()


def test_import_reports_the_true_line_number_past_blank_lines(tmp_path, episodes, params_file):
    log = tmp_path / "deploy.jsonl"
    rows = [e.model_dump(mode="json") for e in episodes]
    rows[2]["split"] = "heldout"
    log.write_text(json.dumps(rows[0]) + "\n\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(ArtifactError, match=r"deploy\.jsonl:5: "):
        collect.import_file(log, "r1", params_file, tmp_path)


def test_import_refuses_undeclared_round_game_round_and_empty_file(tmp_path, episodes, params_file):
    from oel.errors import UserError

    log = tmp_path / "deploy.jsonl"
    _write_log(log, episodes)
    with pytest.raises(UserError, match="r9"):
        collect.import_file(log, "r9", params_file, tmp_path)
    with pytest.raises(UserError) as err:  # a round that plays games: the declaration to write instead
        collect.import_file(log, "r3", params_file, tmp_path)
    assert "round r3 plays games" in str(err.value)
    assert "rounds: {r3: {from: r2, collect: {source: chatlog, chatlog: chatlogs/r3.jsonl}}}" in str(err.value)
    log.write_text("\n")
    with pytest.raises(ArtifactError, match="no episodes"):
        collect.import_file(log, "r1", params_file, tmp_path)
    assert not (tmp_path / "chatlogs").exists()


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


def test_log_round_refuses_params_dvc_would_not_read(tmp_path, params_file):
    from typer.testing import CliRunner

    from oel.cli import app

    other = tmp_path / "other.yaml"
    other.write_text(params_file.read_text())
    result = CliRunner().invoke(app, ["log-round", str(tmp_path / "x.jsonl"), "--round", "r1", "--params", str(other),
                                      "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr == (f"error: {other}: log-round runs dvc repro, which reads {tmp_path / 'params.yaml'}; "
                             "declare the round there\n")


@pytest.mark.parametrize("declared, message", [
    ({"source": "chatlog"}, "rounds.r1.collect: source: chatlog needs chatlog: PATH"),
    ({"source": "games", "chatlog": "x.jsonl"}, "rounds.r1.collect: chatlog is read only with source: chatlog"),
    ({"source": "tapes"}, "rounds.r1.collect.source: Input should be 'games', 'chatlog' or 'traces'"),
    ({"source": "traces"}, "rounds.r1.collect: source: traces needs experiment: NAME"),
    ({"source": "chatlog", "chatlog": "x.jsonl", "md5": "ab"}, "rounds.r1.collect.md5: unknown key"),
    ({"source": "chatlog", "chatlog": "x.jsonl", "sha256": "ab"}, "rounds.r1.collect.sha256: String should match"),
    ({"source": "games", "sha256": "a" * 64}, "rounds.r1.collect: sha256 is read only with source: chatlog"),
])
def test_a_round_declares_its_source_or_one_line_says_what_is_wrong(declared, message):
    from oel.config import ParamsError, parse_params

    with pytest.raises(ParamsError) as err:
        parse_params({"rounds": {"r1": {"from": "base", "collect": declared}}}, "p.yaml")
    assert str(err.value).startswith(f"p.yaml: {message}")
    games = parse_params({"rounds": {"r1": {"from": "base"}}}).rounds["r1"].source
    assert games.source == "games" and games.chatlog is None

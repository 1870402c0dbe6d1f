"""The eval stage's wiring with fakes: real games and engine, a scripted backend, no model, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

import oel.ood
import oel.rollout
from oel import tracking
from oel.artifacts import read_json, read_jsonl, write_json
from oel.metrics import OVERALL, by_game
from oel.paths import ProjectPaths
from oel.plots import curve_row
from oel.rollout import FakeBackend
from oel.schemas import Episode
from oel.stages import evaluate
from tests.conftest import tiny_params

PNG = b"\x89PNG\r\n\x1a\n"
STORE_TEXT = "- EXPERIENCE ITEM: avoid the holes marked H."
OOD = {"instruction_pass": 0.4, "instruction_ci_low": 0.3, "instruction_ci_high": 0.5,
       "instruction_level_pass": 0.5, "loglik_nats_per_token": -3.0, "failed": [], "samples": []}


def fast_params(**eval_overrides):
    return tiny_params(games={"textworld": {"enabled": False}}, eval={"episodes_per_game": 3, **eval_overrides})


class Named(FakeBackend):
    """A scripted backend standing for one policy's engine (the name says which)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Policies are strings; the backend answers per policy; MLflow and the probe are recorded, not run."""
    seen: dict = {"iteration": [], "probe": []}
    monkeypatch.setattr(evaluate, "load_student", lambda params, paths: Named("student"))
    monkeypatch.setattr(evaluate, "load_teacher", lambda params, paths: Named("teacher"))

    def probe(backend, max_new_tokens, batch_size=8):
        seen["probe"].append(backend.name)
        return dict(OOD)

    monkeypatch.setattr(oel.ood, "run_probe", probe)
    monkeypatch.setattr(tracking, "log_to_iteration",
                        lambda params, round_id, metrics, artifacts=(), artifact_path=None:
                        seen["iteration"].append((round_id, dict(metrics), list(artifacts))))
    return seen


def write_stores(paths, n: int = 2, games=("frozenlake", "sokoban")) -> None:
    for game in games:
        for k in range(n):
            paths.store(game, k).parent.mkdir(parents=True, exist_ok=True)
            paths.store(game, k).write_text(f"{STORE_TEXT} ({game} store {k})\n", encoding="utf-8")


def test_round_eval_writes_every_output(tmp_path: Path, fakes: dict):
    params = fast_params()
    paths = ProjectPaths(tmp_path).round("r1")
    write_stores(paths)

    write_json(paths.metrics_file("textworld"), {"pass": 1.0})   # a game no longer enabled
    summary = evaluate.run(params, paths)

    metrics = read_json(paths.details)
    assert summary == metrics
    # The DVC metrics: a few rounded numbers per enabled game, and OOD (no base round to compare with).
    assert sorted(p.name for p in paths.metrics_dir.iterdir()) == ["frozenlake.json", "ood.json", "sokoban.json"]
    lake = read_json(paths.metrics_file("frozenlake"))
    assert lake == {"pass": round(metrics["heldout"]["frozenlake"]["pass_rate"], 4),
                    "teacher": round(metrics["teacher"]["mean"]["frozenlake"]["pass_rate"], 4),
                    "gain": round(metrics["headroom"]["frozenlake"], 4),
                    "invalid": round(metrics["heldout"]["frozenlake"]["invalid_action_rate"], 4),
                    "tokens": round(metrics["heldout"]["frozenlake"]["response_tokens_per_turn"], 4)}
    assert read_json(paths.metrics_file("ood")) == {"pass": 0.4}
    episodes = read_jsonl(paths.eval_episodes, Episode)
    assert len({ep.episode_id for ep in episodes}) == len(episodes)
    student = [ep for ep in episodes if ep.policy == "r1"]
    teacher = [ep for ep in episodes if ep.knowledge_store is not None]
    plain = [ep for ep in episodes if ep.policy == "base" and ep.knowledge_store is None]
    assert len(student) == len(plain) == 6 and len(teacher) == 12   # 3 seeds x 2 games (x 2 stores)
    assert {ep.split for ep in episodes} == {"heldout"}
    # The metrics are exactly the arithmetic of the recorded episodes.
    assert metrics["heldout"] == by_game(student)  # JSON round-trips floats exactly
    assert metrics["teacher_plain"] == by_game(plain)
    assert metrics["headroom"][OVERALL] == pytest.approx(
        metrics["teacher"]["mean"][OVERALL]["pass_rate"] - metrics["teacher_plain"][OVERALL]["pass_rate"])
    assert set(metrics["teacher"]) == {"store_0", "store_1", "mean"}
    # Knowledge reaches the teacher's prompts only, each store only its own episodes, each game only its own stores.
    for ep in teacher:
        content = ep.turns[0].prompt[0].content
        assert f"({ep.game} store {ep.knowledge_store})" in content and content.count(STORE_TEXT) == 1
    assert all(STORE_TEXT not in m.content for ep in student + plain for t in ep.turns for m in t.prompt)
    # The same held-out seeds for the student and for every store.
    assert sorted(ep.seed for ep in student) == sorted(ep.seed for ep in teacher if ep.knowledge_store == 0)
    # The OOD block is this policy's alone (the gate compares it with the champion's), prompt by prompt.
    assert metrics["ood"]["instruction_pass"] == 0.4 and "flag" not in metrics["ood"] and "ood_flag" not in metrics
    assert fakes["probe"] == ["student"]
    for name in ("rounds.png", "levels.png"):
        assert (paths.plots / name).read_bytes().startswith(PNG)
    curve = read_json(paths.plots / "curve.json")
    assert [row["round"] for row in curve] == ["r1"] and curve[0]["pass_rate"] == metrics["heldout"][OVERALL]["pass_rate"]
    [(round_id, headline, artifacts)] = fakes["iteration"]
    assert round_id == "r1"
    assert {"eval_pass_rate", "eval_response_tokens_per_turn", "eval_teacher_pass_rate", "eval_headroom",
            "eval_ood_instruction_pass", "eval_invalid_action_rate", "eval_invalid_action_rate/frozenlake"} <= set(headline)
    assert artifacts == []


def test_headroom_reuses_the_start_policys_own_eval(tmp_path: Path, fakes: dict, monkeypatch: pytest.MonkeyPatch):
    """Held-out seeds are fixed, so reports/<from>/eval.json is the start policy's no-knowledge level."""
    params = fast_params()
    root_paths = ProjectPaths(tmp_path)
    base_metrics = {"heldout": {OVERALL: {"pass_rate": 0.25, "episodes": 6, "passed": 1}},
                    "ood": {"instruction_pass": 0.9, "loglik_nats_per_token": -3.0}}
    write_json(root_paths.round("base").details, base_metrics)
    write_json(root_paths.round("base").plots / "curve.json", [curve_row(0, "base", base_metrics)])
    paths = root_paths.round("r1")
    write_stores(paths, 1)
    played: list[tuple[str, int | None]] = []
    real = evaluate.play_heldout

    def spy(loaded, params, paths, policy, knowledge=None):
        played.append((policy, None if knowledge is None else {g: [k for k, _ in s] for g, s in knowledge.items()}))
        return real(loaded, params, paths, policy, knowledge)

    monkeypatch.setattr(evaluate, "play_heldout", spy)
    metrics = evaluate.run(params, paths)

    # One call for the student, one for every game's stores; no replay of the start policy without knowledge.
    assert played == [("r1", None), ("base", {"frozenlake": [0], "sokoban": [0]})]
    assert metrics["headroom"][OVERALL] == pytest.approx(metrics["teacher"]["mean"][OVERALL]["pass_rate"] - 0.25)
    # No comparison with another round's OOD here: that is the gate's (oel.rounds.gate).
    assert "ood_flag" not in metrics and read_json(paths.metrics_file("ood")) == {"pass": 0.4}
    # The curve is the start policy's (a declared dep) plus this round: the lineage base -> r1.
    curve = read_json(paths.plots / "curve.json")
    assert [(row["step"], row["round"]) for row in curve] == [(0, "base"), (1, "r1")]


def test_an_untrained_round_is_its_start_policys_eval_not_a_replay(tmp_path: Path, fakes: dict,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """distill skipped for lack of headroom: the round's weights are base's, so its student level and OOD probe
    are base's eval (same seeds, same generation seed), not played again; the teacher level still plays."""
    root = ProjectPaths(tmp_path)
    base = evaluate.run(fast_params(), root.round("base"))   # base's real eval, through the same code
    played: list[str] = []
    real = evaluate.play_heldout
    monkeypatch.setattr(evaluate, "play_heldout", lambda backend, params, paths, policy, knowledge=None:
                        played.append(policy) or real(backend, params, paths, policy, knowledge))
    monkeypatch.setattr(evaluate, "load_student", lambda params, paths: pytest.fail("the student was loaded"))
    r1 = root.round("r1")
    write_stores(r1, 1)
    write_json(r1.model / "train_summary.json", {"round": "r1", "from": "base", "trained": False,
                                                 "skipped_reason": "no headline metric better", "steps_run": 0})
    metrics = evaluate.run(fast_params(), r1)

    assert played == ["base"]   # the teacher level only (base + each game's store)
    assert metrics["heldout"] == base["heldout"] and metrics["ood"] == base["ood"]
    assert metrics["untrained"] == {"from": "base", "reason": "no headline metric better"}
    assert fakes["probe"] == ["student"]   # base's probe, once
    assert all(ep.knowledge_store is not None for ep in read_jsonl(r1.eval_episodes, Episode))
    assert read_json(r1.details) == metrics

    # A trained round, or a start eval of another size, is played.
    monkeypatch.setattr(evaluate, "load_student", lambda params, paths: Named("student"))
    played.clear()
    evaluate.run(fast_params(episodes_per_game=2), r1)
    assert played[0] == "r1"
    write_json(r1.model / "train_summary.json", {"round": "r1", "from": "base", "trained": True})
    played.clear()
    evaluate.run(fast_params(), r1)
    assert played[0] == "r1"


def test_base_round_and_without_knowledge(tmp_path: Path, fakes: dict):
    params = fast_params(ood=False)
    paths = ProjectPaths(tmp_path).round("base")
    metrics = evaluate.run(params, paths)
    assert "teacher" not in metrics and "headroom" not in metrics and "ood" not in metrics
    assert sorted(p.name for p in paths.metrics_dir.iterdir()) == ["frozenlake.json", "sokoban.json"]
    assert set(read_json(paths.metrics_file("sokoban"))) == {"pass", "invalid", "tokens"}  # no teacher level
    assert fakes["probe"] == []
    r1 = ProjectPaths(tmp_path).round("r1")
    write_stores(r1)
    metrics = evaluate.run(fast_params(ood=False, with_knowledge=False), r1)
    assert "teacher" not in metrics
    assert all(ep.knowledge_store is None for ep in read_jsonl(r1.eval_episodes, Episode))


def test_missing_student_policy_is_one_clear_error(tmp_path: Path):
    from oel.errors import UserError

    with pytest.raises(UserError, match="oel distill --round r1"):
        evaluate.load_student(tiny_params(), ProjectPaths(tmp_path).round("r1"))


def test_store_files_are_numbered_not_sorted_as_text(tmp_path: Path):
    paths = ProjectPaths(tmp_path).round("r1")
    for k in (10, 2, 0):
        paths.store("sokoban", k).parent.mkdir(parents=True, exist_ok=True)
        paths.store("sokoban", k).write_text("x")
    paths.store("frozenlake", 1).parent.mkdir(parents=True)
    paths.store("frozenlake", 1).write_text("x")
    (paths.game_stores("sokoban") / "notes.md").write_text("ignored")
    files = evaluate.store_files(paths)
    assert list(files) == ["frozenlake", "sokoban"]
    assert [k for k, _ in files["sokoban"]] == [0, 2, 10] and [k for k, _ in files["frozenlake"]] == [1]


class OneMoveGame:
    """A stand-in for any game (TextWorld needs generated games): one model call, then done."""

    header = "You are an agent playing a game on a grid, acting as a reasoning engine."
    question = "What action do you take?"

    def __init__(self, name: str):
        self.name = name

    def reset(self, seed: int) -> str:
        return f"[GAME] {self.name} board {seed}"

    def step(self, response: str):
        from oel.games.base import StepResult

        return StepResult("[GAME] over", "up", True, True, False, 0.0, "Failure: one move only")


def test_with_three_games_no_teacher_episode_reads_another_games_knowledge(tmp_path: Path, fakes: dict,
                                                                            monkeypatch: pytest.MonkeyPatch):
    import oel.games

    games = ("frozenlake", "sokoban", "textworld")
    monkeypatch.setattr(oel.games, "make_game", lambda name, cfg, root: OneMoveGame(name))
    params = tiny_params(eval={"episodes_per_game": 2, "ood": False})
    paths = ProjectPaths(tmp_path).round("r1")
    write_stores(paths, 2, games)

    metrics = evaluate.run(params, paths)

    teacher = [ep for ep in read_jsonl(paths.eval_episodes, Episode) if ep.knowledge_store is not None]
    assert len(teacher) == 3 * 2 * 2 and {ep.game for ep in teacher} == set(games)
    for ep in teacher:
        content = " ".join(m.content for t in ep.turns for m in t.prompt)
        assert f"({ep.game} store {ep.knowledge_store})" in content
        assert not any(f"({other} store" in content for other in games if other != ep.game)
    assert set(metrics["teacher"]["mean"]) == {*games, OVERALL} and set(metrics["headroom"]) == {*games, OVERALL}


def test_teacher_level_refuses_a_game_without_stores_and_the_pooled_layout(tmp_path: Path, fakes: dict):
    from oel.errors import UserError

    params = fast_params()
    paths = ProjectPaths(tmp_path).round("r1")
    write_stores(paths, 1, games=("frozenlake",))
    with pytest.raises(UserError, match="no store-<k>.md for game 'sokoban'"):
        evaluate.run(params, paths)
    write_stores(paths, 1)
    (paths.stores / "store-0.md").write_text("pooled knowledge")
    with pytest.raises(UserError, match="old pooled layout"):
        evaluate.run(params, paths)


@pytest.mark.parametrize(("teacher_stores", "played"), [(0, [0, 1, 2]), (1, [0]), (2, [0, 1]), (5, [0, 1, 2])])
def test_teacher_level_plays_the_first_teacher_stores_of_each_game(tmp_path: Path, teacher_stores, played):
    params = fast_params(teacher_stores=teacher_stores)
    paths = ProjectPaths(tmp_path).round("r1")
    write_stores(paths, 3)
    knowledge = evaluate.teacher_knowledge(params, paths)
    assert {game: [k for k, _ in stores] for game, stores in knowledge.items()} == {
        "frozenlake": played, "sokoban": played}

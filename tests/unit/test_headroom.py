"""The headroom stage with a scripted backend (real games and engine, no model): where knowledge does not help
distill does not train, and the round's policy is its start policy; where it helps, distill trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from oel import tracking
from oel.artifacts import read_json, read_jsonl, write_jsonl
from oel.paths import ProjectPaths
from oel.rollout import FakeBackend
from oel.rollout.fake import hashed_move
from oel.schemas import DistillRow, Episode, HeadroomVerdict, Message, PolicyManifest
from oel.stages import distill, headroom
from tests.conftest import tiny_params

STORE_TEXT = "- EXPERIENCE ITEM: answer with one move in brackets."


def params(**overrides):
    return tiny_params(games={"sokoban": {"enabled": False}, "textworld": {"enabled": False}},
                       headroom={"episodes_per_game": 24, "stores": 0, "bootstrap_resamples": 500, **overrides})


def knows_only_with_knowledge(prompt) -> str:
    """Plays valid moves when the store is in its prompt, and an unparseable answer without it."""
    seen = any(STORE_TEXT in m.content for m in prompt)
    return hashed_move(prompt) if seen else "I am not sure what to do here."


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rp = ProjectPaths(tmp_path).round("r1")
    for k in (0, 1):
        rp.store("frozenlake", k).parent.mkdir(parents=True, exist_ok=True)
        rp.store("frozenlake", k).write_text(STORE_TEXT + "\n", encoding="utf-8")
    monkeypatch.setattr(tracking, "log_to_iteration", lambda *a, **kw: None)
    return rp


def play_with(monkeypatch, script) -> None:
    monkeypatch.setattr(headroom, "build_backend", lambda params, spec, root: FakeBackend(script))


def test_no_headroom_skips_distill_and_the_round_is_its_start_policy(project, monkeypatch):
    play_with(monkeypatch, hashed_move)  # knowledge changes nothing the policy does
    p = params()
    summary = headroom.run(p, project)
    verdict = read_json(project.headroom, HeadroomVerdict)
    assert summary["headroom"] is False and verdict.headroom is False and verdict.better == []
    assert verdict.reason.startswith("no headroom: the teacher (base + this round's knowledge) beat base")
    # The round's own user-side seeds, never held-out ones: plain once, then once per store.
    episodes = read_jsonl(project.headroom_episodes, Episode)
    assert {ep.split for ep in episodes} == {"user"} and len(episodes) == 24 * 3
    assert sorted(ep.knowledge_store for ep in episodes if ep.knowledge_store is not None) == [0] * 24 + [1] * 24

    write_jsonl(project.distill_rows, [])
    monkeypatch.setattr(distill, "load_round_policy", lambda *a: pytest.fail("a model was loaded to train"))
    out = distill.run(p, project)
    assert out["trained"] is False and out["skipped_reason"] == verdict.reason
    manifest = read_json(project.model / "policy.json", PolicyManifest)
    assert (manifest.parent, manifest.adapter, manifest.merged) == ("../base", None, False)
    assert read_json(project.model / "train_summary.json")["trained"] is False


def test_headroom_trains(project, monkeypatch):
    play_with(monkeypatch, knows_only_with_knowledge)
    p = params()
    headroom.run(p, project)
    verdict = read_json(project.headroom, HeadroomVerdict)
    assert verdict.headroom is True
    assert "frozenlake store 0 invalid_action_rate" in verdict.better and "store 1" in verdict.reason
    msg = [Message(role="user", content="move")]
    write_jsonl(project.distill_rows, [DistillRow(row_id="a", episode_id="e", game="frozenlake", turn=0, store=0,
                                                  prompt=msg, teacher_prompt=msg)])

    class Training(Exception):
        pass

    def train(*a):
        raise Training

    monkeypatch.setattr(distill, "load_round_policy", train)
    monkeypatch.setattr(distill, "_plan", lambda dp, n: {"grad_accum": 1, "samples": 1, "rows_repeated": 0})
    with pytest.raises(Training):
        distill.run(p, project)


def test_require_headroom_off_trains_whatever_the_verdict(project, monkeypatch):
    play_with(monkeypatch, hashed_move)
    p = params()
    headroom.run(p, project)
    assert distill.no_headroom(p, project) is not None
    off = p.model_copy(update={"distill": p.distill.model_copy(update={"require_headroom": False})})
    assert distill.no_headroom(off, project) is None


def test_a_round_on_chat_logs_is_not_measured(project, monkeypatch):
    rp = ProjectPaths(project.root).round("r2")
    rp.store("chat", 0).parent.mkdir(parents=True)
    rp.store("chat", 0).write_text("- be brief\n")
    play_with(monkeypatch, lambda prompt: pytest.fail("a game was played"))
    p = params().model_copy(update={"rounds": {**params().rounds, "r2": params().rounds["r1"]}})
    assert headroom.run(p, rp)["headroom"] is True
    assert read_json(rp.headroom, HeadroomVerdict).reason.startswith("not measured")


PLACEBO = "Be friendly and helpful."


def any_paragraph_helps(prompt) -> str:
    """Plays valid moves with anything in the knowledge slot, the store or the placebo alike."""
    seen = any(STORE_TEXT in m.content or PLACEBO in m.content for m in prompt)
    return hashed_move(prompt) if seen else "I am not sure what to do here."


def test_a_store_that_helps_no_more_than_a_placebo_paragraph_is_no_headroom(project, monkeypatch):
    play_with(monkeypatch, any_paragraph_helps)
    assert headroom.run(params(), project)["headroom"] is True   # without the placebo level it would train

    summary = headroom.run(params(placebo=PLACEBO), project)
    verdict = read_json(project.headroom, HeadroomVerdict)
    assert summary["headroom"] is False and verdict.better == [] and summary["episodes"] == 24 * 4
    assert verdict.reason.startswith("no headroom beyond a placebo: the teacher beat base without knowledge on "
                                     "frozenlake store 0 invalid_action_rate")
    assert verdict.checks["frozenlake store 0 invalid_action_rate"]["blocked"] is True
    assert verdict.checks["frozenlake store 0 invalid_action_rate vs placebo"]["blocked"] is False
    placebo = [ep for ep in read_jsonl(project.headroom_episodes, Episode) if ep.episode_id.endswith("-placebo")]
    assert len(placebo) == 24 and all(ep.knowledge_store is None for ep in placebo)
    assert all(PLACEBO in ep.turns[0].prompt[0].content and STORE_TEXT not in ep.turns[0].prompt[0].content
               for ep in placebo)


def test_a_store_that_beats_the_placebo_too_is_headroom(project, monkeypatch):
    play_with(monkeypatch, knows_only_with_knowledge)
    headroom.run(params(placebo=PLACEBO), project)
    verdict = read_json(project.headroom, HeadroomVerdict)
    assert verdict.headroom is True and "frozenlake store 0 invalid_action_rate" in verdict.better
    assert verdict.checks["frozenlake store 0 invalid_action_rate vs placebo"]["blocked"] is True

"""The canary's verdict on hand-written answers (no server): which version answered, the latest rating of each
answer, too few ratings to judge, a canary rated worse beyond the margin rolled back, one within it kept; both
recorded on the champion's decision."""

from __future__ import annotations

import pytest

from oel.config import load_params
from oel.online.canary import judge, ratings
from oel.rounds import lifecycle
from oel.rounds.report import promotion_section
from oel.traces import Answer, Feedback, good, latest_feedback
from tests.unit.test_promotion import evaluated, gate, project


def answer(i: int, served: str, *values) -> Answer:
    """An answer by `served` rated with `values` in turn (the last one counts)."""
    rated = latest_feedback([Feedback(assessment_id=f"a-{i}-{k}", created_ms=k, value=v)
                             for k, v in enumerate(values)])
    return Answer(trace_id=f"tr-{i}", served=served, good=good(rated))


def answers(version: str, good_: int, bad: int, unrated: int = 0, start: int = 0) -> list[Answer]:
    rated = [answer(start + i, f"oel-{version}", i < good_) for i in range(good_ + bad)]
    return rated + [answer(start + 1000 + i, f"oel-{version}") for i in range(unrated)]


def test_a_rating_is_good_above_zero_and_words_are_no_rating():
    def fb(value):
        return Feedback(assessment_id="a", created_ms=0, value=value)

    assert [good(fb(v)) for v in (True, False, 1, 0, 0.75, -1, {"rating": 2}, {"score": 0})] == \
        [True, False, True, False, True, False, True, False]
    assert good(fb("answer in French, please")) is None and good(None) is None and good(fb({"text": "meh"})) is None


def test_each_answer_counts_once_for_the_version_that_gave_it_with_its_latest_rating():
    seen = [answer(1, "oel-r1", False, True), answer(2, "oel-r1", "words only"), answer(3, "oel-base", 0.0),
            answer(4, "oel-r7", True)]
    rated = ratings(seen, ("r1", "base"))
    assert (rated["r1"].good, rated["r1"].rated, rated["r1"].answered) == (1, 1, 2)
    assert (rated["base"].good, rated["base"].rated, rated["base"].answered) == (0, 1, 1)


@pytest.fixture
def params(tmp_path):
    return load_params(project(tmp_path, {"r1": "base"}, serve={"canary_min_ratings": 30, "canary_margin": 0.05}))


def test_too_few_ratings_wait(params):
    verdict = judge(params, "r1", "base", ratings(answers("r1", 5, 20) + answers("base", 40, 0, start=100),
                                                  ("r1", "base")))
    assert verdict.outcome == "waiting" and verdict.test is None
    assert "r1 25 of the 30 each needs" in verdict.reason


def test_a_canary_rated_worse_beyond_the_margin_is_rolled_back_and_one_within_noise_is_kept(params):
    worse = judge(params, "r1", "base", ratings(answers("r1", 12, 28) + answers("base", 28, 12, start=100),
                                                ("r1", "base")))
    assert worse.outcome == "rolled_back" and worse.test.p_value < 0.05
    assert "r1 12/40 rated good (30.0%)" in worse.reason and "worse by 40.0 points" in worse.reason
    noise = judge(params, "r1", "base", ratings(answers("r1", 18, 22) + answers("base", 22, 18, start=100),
                                                ("r1", "base")))
    assert noise.outcome == "kept" and noise.test.p_value > 0.05  # 10 points worse, but within the noise of 40
    better = judge(params, "r1", "base", ratings(answers("r1", 35, 5) + answers("base", 20, 20, start=100),
                                                 ("r1", "base")))
    assert better.outcome == "kept" and "better by 37.5 points" in better.reason


def test_the_verdicts_are_events_on_the_champions_decision(tmp_path):
    path = project(tmp_path, {"r1": "base"})
    evaluated(tmp_path, "base", won=10)
    evaluated(tmp_path, "r1", won=30)
    assert gate(path, "r1").decision == "champion"
    params = load_params(path)
    kept = lifecycle.canary_kept(params, tmp_path, "not worse beyond the margin: r1 30/40 ...")
    assert kept.decision == "champion" and kept.events[-1].kind == "canary"
    assert (kept.events[-1].champion_before, kept.events[-1].champion_after) == ("r1", "r1")
    back = lifecycle.rollback(params, tmp_path, "the canary's users rated it worse: ...", by_canary=True)
    assert (back.decision, back.champion_after, back.events[-1].kind) == ("rolled_back", "base", "canary")
    assert back.reason.startswith("rolled back by its canary's ratings: the canary's users rated it worse")
    assert lifecycle.champion(params, tmp_path) == "base"
    table = lifecycle.rounds_table(params, tmp_path)
    assert "canary: r1 -> r1 (not worse beyond the margin" in table and "canary: r1 -> base (the canary's" in table
    section = promotion_section(params, tmp_path, ["base", "r1"])
    assert "canary of r1: champion r1 → base — `the canary's users rated it worse" in section
    with pytest.raises(lifecycle.PromotionError, match="no promoted round's canary"):
        lifecycle.canary_kept(params, tmp_path, "again")

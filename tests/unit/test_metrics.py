"""Metric arithmetic on hand-made episodes and the Wilson interval against known values."""

from __future__ import annotations

import math

import pytest

from oel.metrics import (
    OVERALL,
    by_game,
    by_store,
    clustered_mean_interval,
    clustered_rate_interval,
    dvc_metrics,
    episode_metrics,
    headroom,
    wilson_interval,
)
from oel.schemas import Episode, Message, Turn


def turn(i: int, tokens: int, valid: bool = True) -> Turn:
    return Turn(index=i, prompt=[Message(role="user", content="board")], response="r" * tokens, action="up",
                valid=valid, observation="obs", response_tokens=tokens)


def episode(game: str, success: bool, tokens: list[int], invalid: int = 0, store: int | None = None,
            seed: int = 0) -> Episode:
    turns = [turn(i, t, valid=i >= invalid) for i, t in enumerate(tokens)]
    return Episode(episode_id=f"{game}-{seed}-{store}", game=game, seed=seed, split="heldout", round="r1",
                   policy="r1", turns=turns, success=success, reward=1.0 if success else 0.0,
                   feedback="Success" if success else "Failure", knowledge_store=store)


# Reference values from an independent implementation:
# scipy.stats.binomtest(k, n).proportion_ci(method="wilson") (scipy 1.x), rounded to 6 places.
@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (0, 10, 0.0, 0.277533),      # zero successes: the upper bound stays well above 0 (Wald would give 0)
    (5, 10, 0.236593, 0.763407),
    (10, 10, 0.722467, 1.0),
    (1, 20, 0.008881, 0.236131),
    (81, 263, 0.255289, 0.366210),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-5)
    assert hi == pytest.approx(high, abs=1e-5)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    lo, hi = wilson_interval(3, 7)
    assert lo < 3 / 7 < hi


def test_episode_metrics_pools_turns_not_episode_means():
    eps = [episode("frozenlake", True, [10, 20]),            # 2 turns, 30 tokens
           episode("frozenlake", False, [4, 4, 4, 4], invalid=2, seed=1)]  # 4 turns, 16 tokens, 2 invalid
    m = episode_metrics(eps)
    assert m["pass_rate"] == 0.5
    assert m["passed"] == 1 and m["episodes"] == 2
    assert m["response_tokens_per_turn"] == pytest.approx(46 / 6)  # pooled, not (15 + 4) / 2
    assert m["turns_per_game"] == 3.0
    assert m["tokens_per_game"] == 23.0
    assert m["invalid_action_rate"] == pytest.approx(2 / 6)
    assert (m["pass_ci_low"], m["pass_ci_high"]) == pytest.approx(wilson_interval(1, 2))


def test_clustered_interval_is_wider_when_games_fail_whole():
    # 20 games x 5 turns, 10 games invalid on every turn: only 20 independent units, not 100 turns.
    whole = [(5, 5)] * 10 + [(0, 5)] * 10
    # The same 50 invalid turns spread evenly (every game 2 or 3 of 5): closer to independent turns.
    spread = [(2, 5)] * 10 + [(3, 5)] * 10
    binomial = wilson_interval(50, 100)
    lo_w, hi_w = clustered_rate_interval(whole)
    lo_s, hi_s = clustered_rate_interval(spread)
    assert hi_w - lo_w > hi_s - lo_s
    # Whole-game failures: the design effect is the 5 turns per game (times n/(n-1), the small-sample
    # correction), so the interval is Wilson's over 19 effective games: between those of 20 and 18 games.
    width = hi_w - lo_w
    assert (lo_w + hi_w) / 2 == pytest.approx(0.5)
    assert _width(wilson_interval(10, 20)) < width < _width(wilson_interval(9, 18))
    # Less spread than binomial never narrows the interval below the binomial one over turns.
    assert (lo_s, hi_s) == pytest.approx(binomial)


def _width(interval: tuple[float, float]) -> float:
    return interval[1] - interval[0]


def test_clustered_interval_edges():
    assert clustered_rate_interval([]) == (0.0, 1.0)
    assert clustered_rate_interval([(0, 0), (0, 0)]) == (0.0, 1.0)
    # No spread to measure at a rate of 0 or 1: Wilson over the turns, with the exact end.
    assert clustered_rate_interval([(3, 3), (2, 2)]) == pytest.approx(wilson_interval(5, 5))
    assert clustered_rate_interval([(0, 3), (0, 2)])[0] == 0.0
    assert clustered_rate_interval([(1, 4)]) == pytest.approx(wilson_interval(1, 4))  # one game: no variance


def test_clustered_mean_interval_by_hand():
    # Games (tokens, turns): (30, 2), (16, 4). Mean 46/6; linearised variance
    # n/(n-1) * sum((y - r m)^2) / M^2 with r = 46/6, M = 6.
    r = 46 / 6
    var = 2 * ((30 - 2 * r) ** 2 + (16 - 4 * r) ** 2) / 36
    lo, hi = clustered_mean_interval([(30, 2), (16, 4)])
    assert lo == pytest.approx(max(0.0, r - 1.959963984540054 * math.sqrt(var)))
    assert hi == pytest.approx(r + 1.959963984540054 * math.sqrt(var))
    assert clustered_mean_interval([(30, 2)]) is None
    assert clustered_mean_interval([]) is None


def test_episode_metrics_intervals_and_turns():
    eps = [episode("frozenlake", False, [8, 8], invalid=2, seed=s) for s in range(10)] + \
          [episode("frozenlake", False, [4, 4], seed=s) for s in range(10, 20)]
    m = episode_metrics(eps)
    assert m["turns"] == 40 and m["invalid_action_rate"] == 0.5
    assert (m["invalid_ci_low"], m["invalid_ci_high"]) == pytest.approx(clustered_rate_interval([(2, 2)] * 10 + [(0, 2)] * 10))
    assert _width(wilson_interval(20, 40)) < m["invalid_ci_high"] - m["invalid_ci_low"]  # wider than per turn
    assert m["tokens_per_turn_ci_low"] < m["response_tokens_per_turn"] == 6.0 < m["tokens_per_turn_ci_high"]


def test_empty_group_is_zero_not_nan():
    m = episode_metrics([])
    assert all(not math.isnan(v) for v in m.values())
    assert m["pass_rate"] == 0.0 and m["pass_ci_high"] == 1.0


def test_by_game_and_overall():
    eps = [episode("frozenlake", True, [5]), episode("frozenlake", True, [5], seed=1),
           episode("sokoban", False, [7, 9]), episode("sokoban", False, [3], seed=1)]
    m = by_game(eps)
    assert set(m) == {"frozenlake", "sokoban", OVERALL}
    assert m["frozenlake"]["pass_rate"] == 1.0
    assert m["sokoban"]["pass_rate"] == 0.0
    assert m[OVERALL]["pass_rate"] == 0.5
    assert m[OVERALL]["response_tokens_per_turn"] == pytest.approx(29 / 5)


def test_by_store_and_headroom():
    teacher = [episode("frozenlake", True, [5], store=0), episode("frozenlake", False, [5], store=0, seed=1),
               episode("frozenlake", True, [5], store=1), episode("frozenlake", True, [5], store=1, seed=1)]
    m = by_store(teacher)
    assert m["store_0"]["frozenlake"]["pass_rate"] == 0.5
    assert m["store_1"]["frozenlake"]["pass_rate"] == 1.0
    assert m["mean"][OVERALL]["pass_rate"] == 0.75
    plain = by_game([episode("frozenlake", False, [5]), episode("frozenlake", True, [5], seed=1)])
    assert headroom(m["mean"], plain) == pytest.approx({"frozenlake": 0.25, OVERALL: 0.25})


def test_by_store_refuses_plain_episodes():
    with pytest.raises(ValueError, match="knowledge_store"):
        by_store([episode("frozenlake", True, [1])])


def test_wilson_bounds_are_exact_at_no_and_all_wins():
    assert wilson_interval(0, 6)[0] == 0.0 and wilson_interval(6, 6)[1] == 1.0


def test_dvc_metrics_keep_a_few_rounded_numbers_per_game():
    block = {"pass_rate": 1 / 3, "invalid_action_rate": 0.125, "response_tokens_per_turn": 41.23456, "episodes": 3}
    details = {"heldout": {"sokoban": block, OVERALL: block},
               "teacher": {"mean": {"sokoban": {"pass_rate": 2 / 3}, OVERALL: {"pass_rate": 2 / 3}},
                           "store_0": {"sokoban": {"pass_rate": 1.0}}},
               "headroom": {"sokoban": 1 / 3, OVERALL: 1 / 3},
               "ood": {"instruction_pass": 0.55556, "loglik_nats_per_token": -3.0, "instruction_pass_delta": -0.1}}
    assert dvc_metrics(details) == {
        "sokoban": {"pass": 0.3333, "teacher": 0.6667, "gain": 0.3333, "invalid": 0.125, "tokens": 41.2346},
        "ood": {"pass": 0.5556, "gain": -0.1}}
    # No teacher level, no OOD probe (the base round): the numbers that exist, nothing pooled.
    assert dvc_metrics({"heldout": {"sokoban": block, OVERALL: block}}) == {
        "sokoban": {"pass": 0.3333, "invalid": 0.125, "tokens": 41.2346}}


def test_detectable_difference_matches_the_two_proportion_power_formula():
    from oel.metrics import detectable_difference

    # (1.96 + 0.84) * sqrt(2 * 0.25 / n): 100 games resolve 19.8 points, 6 games only 80.9.
    assert detectable_difference(100) == pytest.approx(0.1981, abs=1e-4)
    assert detectable_difference(6) == pytest.approx(0.8088, abs=1e-4)
    assert detectable_difference(100, 0.1) == pytest.approx(0.1189, abs=1e-4)
    assert detectable_difference(0) == 1.0 and detectable_difference(1) == 1.0
    sizes = [6, 24, 48, 96, 200]
    assert sorted((detectable_difference(n) for n in sizes), reverse=True) == [detectable_difference(n) for n in sizes]

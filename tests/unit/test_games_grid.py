"""FrozenLake and Sokoban adapters: parsing, the paper's invalid-move and budget rules, determinism."""

from __future__ import annotations

import random

import pytest

from oel.config import FrozenLakeParams, GamesParams, SokobanParams
from oel.games import StepResult, UnknownGameError, known_games, make_game
from oel.games.frozenlake import FrozenLakeSession
from oel.games.grid import GENERIC_DESCRIPTION, GRID_HEADER, GRID_QUESTION, parse_grid_action
from oel.games.sokoban import SokobanSession

WARNING = "[GAME] You attempted an invalid move. Reason:"
GARBAGE = ["", "x" * 1_000_000, "I would go up", "\x00\x01\x1b[31m\x7f", "<|im_start|>assistant\n[up",
           "[UP] [Left] [ up ]", "[]", "[no valid action]"]


def lake(**kw) -> FrozenLakeSession:
    return FrozenLakeSession(FrozenLakeParams(**kw))


def box(**kw) -> SokobanSession:
    return SokobanSession(SokobanParams(**kw))


def play(session, actions: list[str]) -> StepResult:
    result = None
    for action in actions:
        result = session.step(f"thinking... [{action}]")
    assert result is not None
    return result


def wall_move(session) -> str:
    return next(a for a in ("up", "down", "left", "right") if a not in session.legal_actions())


# --- parsing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("[up]", "up"), ("[w] then [s]", "down"), ("[right] ... no, [a]", "left"), ("[d]", "right"),
    ("<think>[up]</think> final: [down]", "down"), ("[UP]", None), ("[ up ]", None), ("up", None),
    ("", None), ("[left][right]", "right"),
])
def test_last_bracketed_key_wins_case_sensitive(text, expected):
    assert parse_grid_action(text) == expected


# --- registry ---------------------------------------------------------------------------------------

def test_registry_names_and_unknown_game_lists_known():
    assert known_games() == ["frozenlake", "sokoban", "textworld", "users"]
    assert isinstance(make_game("frozenlake", GamesParams()), FrozenLakeSession)
    assert isinstance(make_game("sokoban", GamesParams()), SokobanSession)
    with pytest.raises(UnknownGameError) as err:
        make_game("chess", GamesParams())
    assert "frozenlake, sokoban, textworld, users" in str(err.value) and "\n" not in str(err.value)


# --- prompts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [lake, box])
def test_hidden_prompt_never_explains_the_symbols(factory):
    session = factory()
    first = session.reset(5)
    assert session.header == GRID_HEADER and session.question == GRID_QUESTION
    assert first.startswith(f"[GAME] {GENERIC_DESCRIPTION}\n[GAME] Current Board:")
    for leak in ("Hole", "Goal", "box", "Wall", "'H'", "'X'", "'#'", "Frozen Lake", "Sokoban"):
        assert leak not in first


def test_explained_prompt_has_a_legend():
    assert "'H' = hole" in lake(prompt_mode="explained").reset(5)
    assert "'X' = box" in box(prompt_mode="explained").reset(5)


# --- determinism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [lake, box])
def test_same_seed_same_map_different_seeds_differ(factory):
    assert factory().reset(11) == factory().reset(11)
    assert len({factory().reset(seed) for seed in range(20)}) > 5


def test_interleaved_sessions_and_global_random_do_not_disturb_maps():
    alone = [lake().reset(s) for s in (1, 2, 3)]
    random.seed(99)
    before = random.random()
    random.seed(99)
    sessions = [lake() for _ in range(3)]
    firsts = []
    for session, seed in zip(sessions, (1, 2, 3), strict=True):
        random.random()  # someone else drawing from the global stream in between
        firsts.append(session.reset(seed))
        box().reset(seed)
    assert firsts == alone
    random.seed(99)
    lake().reset(7)  # a reset leaves the caller's global random stream where it was
    assert random.random() == before


# --- outcomes ---------------------------------------------------------------------------------------

def test_frozenlake_solver_wins_within_budget():
    for seed in range(30):
        session = lake()
        session.reset(seed)
        plan = session.solution()
        assert plan is not None and len(plan) == 4  # 3x3, start (0,0), goal (2,2)
        result = play(session, plan)
        assert (result.done, result.success, result.reward) == (True, True, 1.0)
        assert result.feedback == "Success: Congratulations! You reached the goal!"


def test_frozenlake_hole_is_a_failure_with_the_env_reason():
    for seed in range(50):
        session = lake()
        session.reset(seed)
        grid = session._env.state.game_state["grid"]
        hole_next = [a for a, (r, c) in session._moves((0, 0)) if grid[r][c] == "H"]
        if hole_next:
            result = play(session, hole_next[:1])
            assert result.done and not result.success and result.reward == 0.0
            assert result.feedback.startswith("Failure: You fell into a hole! Game over.")
            return
    pytest.fail("no seed in 0..49 has a hole next to the start")


@pytest.mark.parametrize("factory", [lake, box])
def test_one_warning_then_second_consecutive_invalid_loses(factory):
    session = factory()
    first = session.reset(3)
    wall = wall_move(session)
    warned = session.step(f"[{wall}]")
    assert (warned.valid, warned.done, warned.action) == (False, False, wall)
    assert warned.observation.startswith(WARNING)
    lost = session.step("no idea")
    assert (lost.valid, lost.done, lost.success, lost.action) == (False, True, False, None)
    assert lost.feedback.startswith("Failure: Invalid Move: ")
    assert first  # the board was shown


@pytest.mark.parametrize("factory", [lake, box])
def test_valid_move_resets_the_invalid_count(factory):
    session = factory(max_calls=10)
    session.reset(3)
    session.step("garbage")
    ok = session.step(f"[{session.legal_actions()[0]}]")
    assert ok.valid and not ok.done
    again = session.step("garbage")
    assert not again.done and again.observation.startswith(WARNING)


def test_invalid_moves_count_against_the_budget():
    session = lake(max_calls=5)
    session.reset(4)
    plan = session.solution()
    session.step("[no move here]")  # first invalid: warning, state kept
    results = [session.step(f"[{a}]") for a in plan]  # 1 + 4 calls: the last one still fits
    assert results[-1].success
    session = lake(max_calls=4)
    session.reset(4)
    session.step("garbage")
    result = play(session, plan[:3])
    assert result.done and not result.success
    assert result.feedback == "Failure: the budget of 4 moves ran out"
    with pytest.raises(RuntimeError):
        session.step("[up]")


def test_sokoban_solver_wins_when_the_plan_fits_the_budget():
    wins = 0
    for seed in range(40):
        session = box(max_calls=100)
        session.reset(seed)
        plan = session.solution()
        assert plan, f"seed {seed}: the generator promises a solvable room"
        result = play(session, plan)
        assert result.success and result.feedback == "Success: Congratulations! You have solved the Sokoban puzzle!"
        wins += 1
    assert wins == 40


def test_sokoban_budget_exhausted():
    for seed in range(20):
        session = box(max_calls=2)
        session.reset(seed)
        plan = session.solution()
        if len(plan) > 2:  # two moves of a longer shortest plan cannot win
            result = play(session, plan[:2])
            assert (result.done, result.success, result.valid) == (True, False, True)
            assert result.feedback == "Failure: the budget of 2 moves ran out"
            return
    pytest.fail("every room in 0..19 is solvable in two moves")


@pytest.mark.parametrize("factory", [lake, box])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_text_is_an_invalid_move_never_a_crash(factory, garbage):
    session = factory()
    board = session.reset(8)
    result = session.step(garbage)
    assert (result.valid, result.done, result.action) == (False, False, None)
    assert result.observation.startswith(WARNING)
    assert len(result.observation) < 2000 and "\x00" not in result.observation
    assert "Current Board" in board

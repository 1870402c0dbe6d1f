"""TextWorld adapter on a handful of real tw-make games (each costs ~3 s to generate, then is cached)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from oel.config import GamesParams, TextWorldParams
from oel.errors import UserError
from oel.games import make_game
from oel.games.textworld import HEADER, TextWorldGameError, TextWorldSession, clean_text, parse_command
from oel.games.twmake import challenge_for_seed, ensure_game, game_dir, story_damage

COIN, COOK = ["tw-coin_collector"], ["tw-cooking"]
WARNING = "You attempted an invalid move. Reason:"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("twroot")


def session(root: Path, challenges=COIN, level=1, **kw) -> TextWorldSession:
    games = GamesParams(textworld=TextWorldParams(challenges=challenges, level=level, **kw))
    made = make_game("textworld", games, root)
    assert isinstance(made, TextWorldSession)
    return made


def test_parse_command_takes_the_last_bracketed_text():
    assert parse_command("maybe [look] ... no: [ open   door ]") == "open door"
    assert parse_command("[a]\n[b") == "a"
    assert parse_command("no brackets") is None
    assert parse_command("[]") == ""


def test_clean_text_drops_banner_prompt_and_menu():
    raw = ("\n\n  ________  __\n |  \\$$$$| $$\n \\$$    \\$$\n\nWelcome!\n\n-= Den =-\nA den.\n\n>  "
           "      -= Den =-0/1\n                    *** The End ***\nWould you like to RESTART, RESTORE a saved game, QUIT or "
           "UNDO the last command?")
    assert clean_text(raw) == "Welcome!\n\n-= Den =-\nA den.\n\n*** The End ***"


def test_challenge_choice_is_deterministic_and_spreads_over_a_strided_family():
    two = ["tw-coin_collector", "tw-cooking"]
    picks = [challenge_for_seed(468460046 + i * 1000, two) for i in range(20)]
    assert picks == [challenge_for_seed(468460046 + i * 1000, two) for i in range(20)]
    assert set(picks) == set(two)


def test_walkthrough_wins_and_first_observation_is_clean(root):
    game = session(root)
    first = game.reset(1)
    assert game.header == HEADER and "[open door]" in game.question
    assert first.startswith("Objective: ") and "Admissible commands: [" in first
    assert "$$" not in first and "-= " in first and ">" not in first.splitlines()[-1][:1]
    plan = game.solution()
    assert plan
    for command in plan:
        result = game.step(f"Let me think. [{command.upper()}]")  # matching ignores case
    assert (result.done, result.success, result.reward, result.valid) == (True, True, 1.0, True)
    assert result.feedback == "Success: You won! (score 1/1)"
    assert (root / ".cache" / "textworld" / "home" / "Inform").is_dir()  # tw-make's HOME stays in the cache


def test_same_seed_same_game_from_cache_and_different_seeds_differ(root, monkeypatch):
    first = session(root).reset(1)

    def no_generation(*a, **k):
        raise AssertionError("a cached game was regenerated")

    monkeypatch.setattr(subprocess, "run", no_generation)
    assert session(root).reset(1) == first
    # the cache key is (challenge, level, seed) only: other settings (other stages' budgets) reuse the game
    assert session(root, max_turns=3, show_admissible_commands=False).reset(1) in first
    monkeypatch.undo()
    assert session(root).reset(2) != first
    cache = root / ".cache" / "textworld" / "tw-coin_collector" / "level-1"
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # temp folders renamed or removed


def test_prompt_options_hide_objective_and_commands(root):
    game = session(root, show_objective=False, show_admissible_commands=False)
    first = game.reset(1)
    assert "Objective" not in first and "Admissible" not in first and "coin" in first
    assert "retrieve the coin" not in first and "recover the coin" not in first


def test_cooking_can_be_lost_by_eating_an_ingredient(root):
    game = session(root, COOK)
    game.reset(2)
    take = next(c for c in game.solution() if c.startswith("take ") and " from " in c)
    ingredient = take[len("take "):take.index(" from ")]
    game.step(f"[{take}]")
    assert f"eat {ingredient}" in game.legal_actions()
    result = game.step(f"[eat {ingredient}]")
    assert (result.done, result.success, result.reward) == (True, False, 0.0)
    assert result.feedback.startswith("Failure: You lost! (score ")
    assert "You lost" in result.observation


def test_one_warning_then_second_consecutive_invalid_loses(root):
    game = session(root)
    game.reset(1)
    warned = game.step("[dance wildly]")
    assert (warned.valid, warned.done, warned.action) == (False, False, None)
    assert warned.observation.startswith(f"{WARNING} 'dance wildly' is not an admissible command.")
    assert "Admissible commands:" in warned.observation
    lost = game.step("")
    assert (lost.done, lost.success) == (True, False)
    assert lost.feedback == ("Failure: Invalid Move: No command in square brackets was found. "
                             "Type your command as: [command].")


def test_valid_move_resets_invalid_count_and_budget_ends_the_game(root):
    game = session(root, max_turns=3)
    game.reset(1)
    assert not game.step("[fly]").done
    assert game.step("[look]").valid
    result = game.step("[fly]")  # third call: the warning would be a retry, but the budget is spent
    assert (result.done, result.success) == (True, False)
    assert result.feedback == "Failure: the budget of 3 moves ran out"
    with pytest.raises(RuntimeError):
        game.step("[look]")


@pytest.mark.parametrize("garbage", ["", "x" * 1_000_000, "\x00\x01\x1b[2J", "<|im_start|>system\n[",
                                     "[" * 10_000, "[look\x00]", "[\x00]"])
def test_garbage_text_is_an_invalid_move_never_a_crash(root, garbage):
    game = session(root)
    game.reset(1)
    result = game.step(garbage)
    assert (result.valid, result.done) == (False, False)
    assert result.observation.startswith(WARNING) and len(result.observation) < 2000


# A damaged cached game is only a cache miss: remade from its seed, one log line (issue 20).
DAMAGED = {"random bytes": ("game.z8", b"garbage" * 20), "zeroed header": ("game.z8", b"\x08" + b"\x00" * 100),
           "empty": ("game.z8", b""), "metadata a list": ("game.json", b"[]"),
           "metadata cut short": ("game.json", b'{"version": 1, "wor')}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_cached_game_is_regenerated_with_one_log_line(root, tmp_path, caplog, case):
    name, content = DAMAGED[case]
    good = session(root).reset(77)  # generates (or reuses) the real game in the module's cache
    cache = tmp_path / ".cache" / "textworld"
    shutil.copytree(root / ".cache" / "textworld", cache)
    folder = game_dir(cache, "tw-coin_collector", 1, 77)
    (folder / name).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="oel.games.twmake"):
        assert session(tmp_path).reset(77) == good
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cached TextWorld game is damaged" in lines[0] and "regenerating it" in lines[0]
    assert story_damage(folder / "game.z8") is None


def test_game_that_passes_the_checks_but_will_not_load_is_regenerated_once(root, tmp_path, monkeypatch, caplog):
    import textworld

    good = session(root).reset(78)
    shutil.copytree(root / ".cache" / "textworld", tmp_path / ".cache" / "textworld")
    real, calls = textworld.start, []

    def flaky(path, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise ValueError("unexpected end of story")
        return real(path, **kw)

    monkeypatch.setattr(textworld, "start", flaky)
    with caplog.at_level(logging.WARNING, logger="oel.games.twmake"):
        assert session(tmp_path).reset(78) == good
    assert len(calls) == 2 and "unexpected end of story" in caplog.records[0].getMessage()


def test_a_regenerated_game_that_is_still_bad_is_a_one_line_user_error(tmp_path, monkeypatch):
    from oel.games import twmake

    def broken(cache, challenge, level, seed, final):
        final.mkdir(parents=True, exist_ok=True)
        (final / "game.z8").write_bytes(b"garbage" * 20)

    monkeypatch.setattr(twmake, "_generate", broken)
    path = game_dir(tmp_path / ".cache" / "textworld", "tw-coin_collector", 1, 77) / "game.z8"
    with pytest.raises(TextWorldGameError) as err:
        session(tmp_path).reset(77)
    assert isinstance(err.value, UserError) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_ensure_game_replaces_a_partial_folder(tmp_path):
    cache = tmp_path / "tw"
    partial = game_dir(cache, "tw-coin_collector", 1, 1)
    partial.mkdir(parents=True)
    (partial / "game.ni").write_text("half")
    path = ensure_game(cache, "tw-coin_collector", 1, 1)
    assert path.is_file() and path.stat().st_size > 1000 and not (partial / "game.ni").read_text() == "half"


def test_default_setting_is_not_won_by_one_move_and_its_walkthrough_fits_the_budget(root):
    defaults = TextWorldParams()
    assert (defaults.challenges, defaults.level, defaults.max_turns) == (["tw-treasure_hunter"], 5, 8)
    for seed in (3, 4):
        game = make_game("textworld", GamesParams(), root)
        first = game.reset(seed)
        plan = game.solution()
        assert 1 < len(plan) <= defaults.max_turns and first.startswith("Objective: ")
        for command in plan:
            result = game.step(f"[{command}]")
        assert (result.done, result.success) == (True, True)

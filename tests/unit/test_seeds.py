"""Seed partitions: disjoint across splits, rounds and games; held-out fixed for every round."""

from __future__ import annotations

import itertools

import pytest

from oel.errors import UserError
from oel.games import UnknownGameError, known_games
from oel.seeds import episode_seeds

ROUNDS = [f"r{i}" for i in range(1, 11)]


def test_every_family_is_disjoint_for_realistic_sizes():
    n = 256  # above the gpu profile's 128 episodes per game
    families = {}
    for game in known_games():
        families[(game, "heldout")] = episode_seeds(1234, game, "heldout", None, n)
        for rnd, split in itertools.product(ROUNDS, ("user", "extract")):
            families[(game, split, rnd)] = episode_seeds(1234, game, split, rnd, n)
    seen: set[int] = set()
    for key, seeds in families.items():
        assert len(seeds) == n == len(set(seeds)), key
        assert seen.isdisjoint(seeds), key
        seen.update(seeds)
    assert all(0 <= s < 2**31 for s in seen)


def test_heldout_is_identical_in_every_round_and_user_extract_are_not():
    fixed = episode_seeds(1234, "frozenlake", "heldout", None, 128)
    assert all(episode_seeds(1234, "frozenlake", "heldout", r, 128) == fixed for r in ROUNDS)
    assert episode_seeds(1234, "frozenlake", "user", "r1", 8) != episode_seeds(1234, "frozenlake", "user", "r2", 8)
    assert episode_seeds(1234, "sokoban", "extract", "r1", 4) != episode_seeds(1234, "sokoban", "extract", "r2", 4)


def test_deterministic_prefix_stable_and_base_seed_moves_everything():
    assert episode_seeds(7, "textworld", "user", "r3", 10)[:4] == episode_seeds(7, "textworld", "user", "r3", 4)
    assert episode_seeds(7, "sokoban", "heldout", None, 16) != episode_seeds(8, "sokoban", "heldout", None, 16)
    assert episode_seeds(7, "sokoban", "heldout", None, 0) == []


@pytest.mark.parametrize(("args", "needle"), [
    ((1234, "chess", "user", "r1", 4), "known games"),
    ((1234, "frozenlake", "user", None, 4), "round id"),
    ((1234, "frozenlake", "extract", "round1", 4), "round id"),
    ((1234, "frozenlake", "user", "r1000", 4), "r999"),
    ((1234, "frozenlake", "user", "r1", 10**6), "n=1000000"),
    ((-1, "frozenlake", "heldout", None, 4), "seed=-1"),
])
def test_bad_arguments_are_one_line_user_errors(args, needle):
    with pytest.raises(UserError) as err:
        episode_seeds(*args)
    assert needle in str(err.value) and "\n" not in str(err.value)
    if args[1] == "chess":
        assert isinstance(err.value, UnknownGameError)

"""Disjoint episode seeds: user-side and extraction seeds change every round, held-out seeds never do.

Like the reference's offset families (held-out 468460046 + i*1000, extraction + r*500000, deployment
505209463 + (r-1)*1e7), every (split, game, round) owns one block of consecutive integers:

    seed = base_seed + SPLIT_OFFSET[split] + GAME_BLOCK * game_index + ROUND_BLOCK * round_index + i

with i < MAX_EPISODES. Blocks never overlap, so the three splits, every round and every game are
disjoint by construction; held-out uses round_index 0 whatever the round, so it is fixed. All seeds stay
below 2**31 (tw-make and numpy accept them).
"""

from __future__ import annotations

from typing import Literal

from oel.config import ROUND_ID
from oel.errors import UserError
from oel.games.registry import UnknownGameError, known_games

Split = Literal["user", "extract", "heldout"]

MAX_EPISODES = 100_000            # per (split, game, round)
MAX_ROUNDS = 999                  # r1 .. r999
ROUND_BLOCK = MAX_EPISODES
GAME_BLOCK = ROUND_BLOCK * (MAX_ROUNDS + 1)
GAME_SLOTS = 4                    # frozenlake, sokoban, textworld, users (the registry order); full
SPLIT_BLOCK = GAME_BLOCK * GAME_SLOTS
SPLIT_OFFSET = {"heldout": 0, "extract": SPLIT_BLOCK, "user": 2 * SPLIT_BLOCK}
MAX_BASE_SEED = 2**31 - 1 - 3 * SPLIT_BLOCK


class SeedError(UserError, ValueError):
    """A base seed, round id or episode count the partition cannot place."""


def episode_seeds(base_seed: int, game: str, split: Split, round_id: str | None, n: int) -> list[int]:
    """`n` seeds for `game`'s episodes of `split` in round `round_id` (ignored for heldout)."""
    if split not in SPLIT_OFFSET:
        raise SeedError(f"unknown seed split {split!r}; use one of {', '.join(SPLIT_OFFSET)}")
    games = known_games()
    if game not in games:
        raise UnknownGameError(f"unknown game {game!r}; known games: {', '.join(games)}")
    if not 0 <= n <= MAX_EPISODES:
        raise SeedError(f"n={n} episodes: must be between 0 and {MAX_EPISODES} per game, split and round")
    if not 0 <= base_seed <= MAX_BASE_SEED:
        raise SeedError(f"seed={base_seed}: must be between 0 and {MAX_BASE_SEED}")
    round_index = 0 if split == "heldout" else _round_index(round_id)
    start = base_seed + SPLIT_OFFSET[split] + GAME_BLOCK * games.index(game) + ROUND_BLOCK * round_index
    return list(range(start, start + n))


def _round_index(round_id: str | None) -> int:
    if round_id is None or not ROUND_ID.match(round_id):
        raise SeedError(f"round id {round_id!r} must look like r1, r2, ... for user and extract seeds")
    index = int(round_id[1:])
    if index > MAX_ROUNDS:
        raise SeedError(f"round {round_id}: at most r{MAX_ROUNDS} rounds have their own seeds")
    return index

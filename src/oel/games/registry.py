"""Game sessions by registry name. Each make_game() call returns a fresh, independent session."""

from __future__ import annotations

from pathlib import Path

from oel.config import GamesParams
from oel.errors import UserError
from oel.games.base import GameSession
from oel.paths import ProjectPaths

_KNOWN = ("frozenlake", "sokoban", "textworld", "users")


class UnknownGameError(UserError, ValueError):
    """A game name that is not registered."""


def known_games() -> list[str]:
    return list(_KNOWN)


def make_game(name: str, games: GamesParams, root: Path = Path(".")) -> GameSession:
    """A new session of game `name` configured by the params' games section (TextWorld caches its
    generated games under `root`/.cache/textworld)."""
    if name == "frozenlake":
        from oel.games.frozenlake import FrozenLakeSession

        return FrozenLakeSession(games.frozenlake)
    if name == "sokoban":
        from oel.games.sokoban import SokobanSession

        return SokobanSession(games.sokoban)
    if name == "textworld":
        from oel.games.textworld import TextWorldSession

        return TextWorldSession(games.textworld, ProjectPaths(Path(root)).textworld_cache)
    if name == "users":
        from oel.games.users import UsersSession

        return UsersSession(games.users)
    raise UnknownGameError(f"unknown game {name!r}; known games: {', '.join(_KNOWN)}")

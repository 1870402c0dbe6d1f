"""Text games behind one protocol (base.GameSession): FrozenLake, Sokoban, TextWorld.

make_game(name, params.games, root) gives a fresh session per episode; known_games() lists the names.
Beyond the protocol every session offers `legal_actions()`, `solution()` (a shortest/walkthrough plan
from the current state, for tests and baselines), `calls` and `done`.
"""

from oel.games.base import GameSession, StepResult
from oel.games.registry import UnknownGameError, known_games, make_game

__all__ = ["GameSession", "StepResult", "UnknownGameError", "known_games", "make_game"]

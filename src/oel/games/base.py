"""The one protocol every text game implements (FrozenLake, Sokoban, TextWorld, simulated users).

A session is one episode: reset(seed) gives the first observation, step(response) takes the model's
raw response text, parses the action itself (garbage is an invalid move, never an exception), and
answers with the new game text. Budgets (model calls), invalid-move allowance and the final feedback
line live in the session, so every caller plays by the paper's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepResult:
    observation: str        # new game text after this call (move message, board, warning...)
    action: str | None      # the parsed action ("up", "take key"); None when nothing parseable
    valid: bool             # the env accepted the action
    done: bool
    success: bool           # reward == 1 (grid games) / won (TextWorld)
    reward: float
    feedback: str | None    # set when done: "Success: <reason>" or "Failure: <reason>"


class GameSession(Protocol):
    name: str               # registry name: frozenlake | sokoban | textworld | users
    header: str             # first line of the play prompt ("You are an agent playing ...")
    question: str           # closing line of the play prompt (which action, answer format)

    def reset(self, seed: int) -> str:
        """Start the episode for `seed` (deterministic) and return the first observation text."""
        ...

    def step(self, response: str) -> StepResult:
        """Apply one model call: parse the action from the raw response and advance the game."""
        ...

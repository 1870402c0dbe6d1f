"""Shared machinery of the grid games (FrozenLake, Sokoban) played on TextArena 0.7.4's env classes.

Rules of play, as the paper's reference code (LMOps/oel, vllm_rollout_spmd.py) plays them:

- Parsing: the action is the LAST occurrence, anywhere in the raw response (thinking included), of one
  of the literal keys [up] [down] [left] [right] [w] [a] [s] [d] (case-sensitive). It is normalised to a
  direction ("up") and sent to the env as "[up]". No key -> the env receives "[no valid action]", which
  it rejects as an invalid move.
- Invalid moves: TextArena's SinglePlayerState(error_allowance=1). The first invalid move adds the
  env's "You attempted an invalid move. Reason: ..." warning, moves nothing and is not an env turn;
  a second CONSECUTIVE invalid move ends the game (reward < 1, i.e. failure). A valid move in between
  resets the count. This is already the paper's semantics, so the adapter adds nothing to it.
- Budget: at most `max_calls` model calls per game; invalid calls count. When the budget runs out the
  game ends as a failure ("the budget of N moves ran out").
- Success: reward == 1 exactly (every other reward is clamped to 0, as the reference does).
- Observation: the env's new GAME messages after each call, one "[GAME] <message>" block each (the
  reference transcript format; the player's own "[Player] [up]" lines are the caller's to render from
  StepResult.action). The first observation is the game description followed by the first board; in the
  paper's `hidden` prompt mode TextArena's rules paragraph is replaced by a generic sentence that never
  says what the board symbols mean.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import re
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from oel.config import GridGameParams
from oel.games.base import StepResult

log = logging.getLogger(__name__)

GRID_HEADER = "You are an agent playing a game on a grid, acting as a reasoning engine."
# The reference's closing line, verbatim.
GRID_QUESTION = ("What action do you take? (Remember to wrap your final answer of the action in "
                 "square brackets)")
# The reference's replacement for TextArena's rules paragraph (both games), verbatim.
GENERIC_DESCRIPTION = (
    "You are the player and you are represented by 'P' on the grid. You should select the best action to "
    "reach the goal in the shortest number of steps. Your only way to interact is to move one step each "
    "time. Available actions: up, down, left, right (or w, a, s, d). Type your action as: [up], [down], "
    "[left], [right] or [w], [a], [s], [d]")

DIRECTIONS = ("up", "down", "left", "right")
ACTION_KEYS = {"[up]": "up", "[down]": "down", "[left]": "left", "[right]": "right",
               "[w]": "up", "[a]": "left", "[s]": "down", "[d]": "right"}
_KEY_RE = re.compile("|".join(re.escape(k) for k in ACTION_KEYS))
NO_ACTION = "[no valid action]"
DELTAS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

# TextArena seeds the process-global `random` module in State.__init__ and FrozenLake draws its map from
# it. One lock plus save/restore makes reset(seed) a pure function of the seed even with many sessions
# (or threads) interleaved, and leaves everyone else's `random` stream untouched.
_RANDOM_LOCK = threading.Lock()


def parse_grid_action(response: str) -> str | None:
    """The direction of the last action key in `response`, or None when there is none."""
    keys = _KEY_RE.findall(response)
    return ACTION_KEYS[keys[-1]] if keys else None


def bfs_path(start: Hashable, moves: Callable[[Any], Iterable[tuple[str, Any]]],
             is_goal: Callable[[Any], bool], limit: int = 200_000) -> list[str] | None:
    """Shortest action list from `start` to a goal state, or None when no goal is reachable."""
    parents: dict[Any, tuple[Any, str] | None] = {start: None}
    queue = deque([start])
    while queue and len(parents) < limit:
        state = queue.popleft()
        if is_goal(state):
            path: list[str] = []
            while parents[state] is not None:
                state, action = parents[state]
                path.append(action)
            return path[::-1]
        for action, nxt in moves(state):
            if nxt not in parents:
                parents[nxt] = (state, action)
                queue.append(nxt)
    return None


class GridSession:
    """One episode of a TextArena grid game; subclasses build the env and know its board."""

    name = "grid"
    header = GRID_HEADER
    question = GRID_QUESTION

    def __init__(self, params: GridGameParams):
        self.params = params
        self._env: Any = None
        self.calls = 0
        self.done = False

    # --- hooks ---------------------------------------------------------------------------------
    def _make_env(self) -> Any:
        raise NotImplementedError

    def _legend(self) -> str:
        raise NotImplementedError

    def legal_actions(self) -> list[str]:
        """Directions the env would accept now (not necessarily safe)."""
        raise NotImplementedError

    def solution(self) -> list[str] | None:
        """Shortest direction list from the current state to a win (BFS), None if there is none."""
        raise NotImplementedError

    # --- protocol ------------------------------------------------------------------------------
    def reset(self, seed: int) -> str:
        printed = io.StringIO()
        with _RANDOM_LOCK:
            saved = random.getstate()
            try:
                env = self._make_env()
                # TextArena prints (not logs) its rare generator warnings; keep stdout clean.
                with contextlib.redirect_stdout(printed):
                    env.reset(num_players=1, seed=seed)
            finally:
                random.setstate(saved)
        if printed.getvalue().strip():
            log.warning("%s seed %d: %s", self.name, seed, printed.getvalue().strip())
        self._env, self.calls, self.done = env, 0, False
        messages = self._new_game_messages()
        messages[0] = self._description()  # the env's PROMPT (rules paragraph) always comes first
        return _render(messages)

    def step(self, response: str) -> StepResult:
        if self._env is None:
            raise RuntimeError(f"{self.name}: call reset(seed) before step()")
        if self.done:
            raise RuntimeError(f"{self.name}: the episode is over; reset(seed) starts a new one")
        if not isinstance(response, str):
            response = "" if response is None else str(response)
        action = parse_grid_action(response)
        env_done, _ = self._env.step(f"[{action}]" if action else NO_ACTION)
        self.calls += 1
        state = self._env.state
        messages = self._new_game_messages()
        valid = action is not None and not state.game_info[0]["invalid_move"] and not any(
            m.startswith("You attempted an invalid move.") for m in messages)
        if env_done:
            reward = 1.0 if (state.rewards or {}).get(0, 0.0) >= 1.0 else 0.0  # reference clamps < 1 to 0
            verdict = "Success" if reward == 1.0 else "Failure"
            return self._finish(messages, action, valid, reward, f"{verdict}: {state.game_info[0]['reason']}")
        if self.calls >= self.params.max_calls:
            return self._finish(messages, action, valid, 0.0,
                                f"Failure: the budget of {self.params.max_calls} moves ran out")
        return StepResult(_render(messages), action, valid, False, False, 0.0, None)

    # --- helpers -------------------------------------------------------------------------------
    def _finish(self, messages: list[str], action: str | None, valid: bool, reward: float,
                feedback: str) -> StepResult:
        self.done = True
        return StepResult(_render(messages), action, valid, True, reward == 1.0, reward, feedback)

    def _description(self) -> str:
        if self.params.prompt_mode == "explained":
            return f"{GENERIC_DESCRIPTION}\n{self._legend()}"
        return GENERIC_DESCRIPTION

    def _new_game_messages(self) -> list[str]:
        """Messages the env addressed to the player since the last call, minus the player's own echo."""
        import textarena as ta

        _, observations = self._env.get_observation()
        return [message.strip("\n") for sender, message, _ in observations if sender == ta.GAME_ID]


def _render(messages: list[str]) -> str:
    return "\n".join(f"[GAME] {m}" for m in messages)

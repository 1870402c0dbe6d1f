"""TextWorld 1.7 text adventures behind the GameSession protocol.

Each seed picks a challenge from params `challenges` (a hash of the seed) and plays the game tw-make
generates for (challenge, level, seed) — generated once, then cached (twmake.py).

Answer format: the model's command is the LAST bracketed text in its response, e.g. "... so [open door]".
It is matched case- and space-insensitively against the game's admissible commands and sent to the game
in its admissible spelling. Invalid moves mirror the grid games (TextArena's error allowance of 1): no
bracketed text, or a bracketed text that is not admissible, earns one warning ("You attempted an invalid
move. Reason: ...") and a retry with the game untouched; a second consecutive invalid move loses.

Budget: `max_turns` model calls per game, invalid calls included (the grid games' `max_calls` rule).
Success: the game is won. A lost game (e.g. tw-cooking: eating a raw ingredient) is a failure.

Observation: the game's text with the big TEXTWORLD banner, the ">" prompt line and the status bar cut
away; the first one starts with "Objective: ..." when show_objective, and every one ends with the
admissible commands, bracketed, when show_admissible_commands.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from oel.config import TextWorldParams
from oel.errors import UserError
from oel.games.base import StepResult
from oel.games.twmake import challenge_for_seed, ensure_game, story_damage

HEADER = "You are an agent playing a text adventure game, acting as a reasoning engine."
QUESTION = ('What command do you take? (Remember to wrap your final answer, one command, in square '
            'brackets, e.g. "[open door]")')

_BRACKETED = re.compile(r"\[([^\[\]\n]*)\]")
_BANNER_LINE = re.compile(r"^[ _|\\/$<>]*$")   # the ASCII-art banner uses only these characters
_PROMPT_LINE = re.compile(r"^>.*$", re.MULTILINE)
_END_QUESTION = "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"
_WARNING = ("You attempted an invalid move. Reason: {reason} Please resubmit a valid move and remember to "
            "follow the game rules to avoid penalties.")


class TextWorldGameError(UserError):
    """A cached game file that cannot be loaded; `reason` is why, without the path or the fix."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; delete its folder to regenerate")
        self.reason = reason


def parse_command(response: str) -> str | None:
    """The last bracketed text in `response`, whitespace-collapsed; None when there is none."""
    found = _BRACKETED.findall(response)
    return " ".join(found[-1].split()) if found else None


def clean_text(text: str) -> str:
    """Game output without the banner, the '>' prompt + status bar and the end-of-game menu."""
    lines = text.replace("\r", "").split("\n")
    start = 0
    while start < len(lines) and _BANNER_LINE.match(lines[start]):
        start += 1
    body = "\n".join(lines[start:])
    body = _PROMPT_LINE.sub("", body).replace(_END_QUESTION, "")
    body = re.sub(r"[ \t]+\n", "\n", body)
    body = re.sub(r"^ {8,}", "", body, flags=re.MULTILINE)  # centred "*** The End ***" lines
    return re.sub(r"\n{3,}", "\n\n", body).strip()


def _check_story_file(path: Path) -> None:
    """Last guard before the Z-machine loads a file (a regenerated game that is still bad is an error)."""
    if (why := story_damage(path)) is not None:
        raise TextWorldGameError(path, why)


class TextWorldSession:
    name = "textworld"
    header = HEADER
    question = QUESTION

    def __init__(self, params: TextWorldParams, cache: Path):
        self.params = params
        self.cache = Path(cache)
        self._env: Any = None
        self._state: Any = None
        self.calls = 0
        self.done = False
        self.game_file: Path | None = None
        self._errors = 0
        self._taken: list[str] = []
        self._walkthrough: list[str] = []

    # --- protocol ------------------------------------------------------------------------------
    def reset(self, seed: int) -> str:
        self.close()
        challenge = challenge_for_seed(seed, list(self.params.challenges))
        self.game_file = ensure_game(self.cache, challenge, self.params.level, seed)
        try:
            self._env, self._state = _start(self.game_file)
        except TextWorldGameError as err:  # passed the header checks, still would not load: remake it once
            self.game_file = ensure_game(self.cache, challenge, self.params.level, seed, damaged=err.reason)
            self._env, self._state = _start(self.game_file)
        self.calls, self.done, self._errors, self._taken = 0, False, 0, []
        self._walkthrough = list(self._state.get("extra.walkthrough") or [])
        objective = (self._state.objective or "").strip()
        intro = clean_text(self._state.feedback)
        if objective:
            intro = intro.replace(objective, "").strip()  # shown (or hidden) on its own line below
        parts = [f"Objective: {objective}"] if self.params.show_objective and objective else []
        return "\n\n".join([*parts, intro, *self._commands_line()])

    def step(self, response: str) -> StepResult:
        if self._env is None:
            raise RuntimeError("textworld: call reset(seed) before step()")
        if self.done:
            raise RuntimeError("textworld: the episode is over; reset(seed) starts a new one")
        if not isinstance(response, str):
            response = "" if response is None else str(response)
        self.calls += 1
        text = parse_command(response)
        command = self._admissible(text)
        if command is None:
            return self._invalid(text)
        self._errors = 0
        self._taken.append(command)
        self._state, _, _ = self._env.step(command)
        observation = clean_text(self._state.feedback)
        if self._state.won:
            return self._finish(observation, command, True, f"Success: You won! ({self._score()})")
        if self._state.lost:
            return self._finish(observation, command, True, f"Failure: You lost! ({self._score()})")
        if self.calls >= self.params.max_turns:
            return self._finish(observation, command, True,
                                f"Failure: the budget of {self.params.max_turns} moves ran out")
        return StepResult("\n\n".join([observation, *self._commands_line()]), command, True, False, False,
                          0.0, None)

    # --- optional members ----------------------------------------------------------------------
    def legal_actions(self) -> list[str]:
        return list(self._state.admissible_commands or []) if self._state is not None else []

    def solution(self) -> list[str] | None:
        """The rest of the game's walkthrough while every move so far followed it, else None."""
        k = len(self._taken)
        return self._walkthrough[k:] if self._taken == self._walkthrough[:k] else None

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    # --- helpers -------------------------------------------------------------------------------
    def _admissible(self, text: str | None) -> str | None:
        if not text:
            return None
        by_key = {" ".join(c.lower().split()): c for c in self.legal_actions()}
        return by_key.get(text.lower())

    def _invalid(self, text: str | None) -> StepResult:
        if text is None:
            reason = "No command in square brackets was found. Type your command as: [command]."
        else:
            reason = f"'{text[:200]}' is not an admissible command."
        if self._errors == 0:
            self._errors = 1
            warning = _WARNING.format(reason=reason)
            if self.calls >= self.params.max_turns:
                return self._finish(warning, None, False,
                                    f"Failure: the budget of {self.params.max_turns} moves ran out")
            return StepResult("\n\n".join([warning, *self._commands_line()]), None, False, False, False,
                              0.0, None)
        return self._finish("", None, False, f"Failure: Invalid Move: {reason}")

    def _finish(self, observation: str, action: str | None, valid: bool, feedback: str) -> StepResult:
        self.done = True
        success = feedback.startswith("Success")
        self.close()  # frees the interpreter; sessions are one episode each
        return StepResult(observation, action, valid, True, success, 1.0 if success else 0.0, feedback)

    def _score(self) -> str:
        return f"score {self._state.score}/{self._state.max_score}"

    def _commands_line(self) -> list[str]:
        if not self.params.show_admissible_commands:
            return []
        return ["Admissible commands: " + ", ".join(f"[{c}]" for c in self.legal_actions())]


def _start(game_file: Path) -> tuple[Any, Any]:
    import textworld
    from textworld import EnvInfos

    _check_story_file(game_file)
    infos = EnvInfos(admissible_commands=True, won=True, lost=True, objective=True, score=True,
                     max_score=True, extras=["walkthrough"])
    try:
        with warnings.catch_warnings():
            # jericho flags every TextWorld game "not fully supported" (its score detection); irrelevant here.
            warnings.filterwarnings("ignore", message=".*not fully supported.*")
            env = textworld.start(str(game_file), request_infos=infos)
            return env, env.reset()
    except Exception as err:  # any load failure is the file's fault, as far as the user can act on it
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TextWorldGameError(game_file, f"cannot load TextWorld game ({first})") from None

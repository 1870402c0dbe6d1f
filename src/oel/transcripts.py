"""Trajectories as text for the extractor (and for the teacher in the raw-trajectory ablation).

The paper's extraction transcript: for each turn k, "Round{k}_Input: <the game's new text>" and
"Round{k}_Output: <the full raw response, thinking included>", then the final feedback. The turn-0
rules/description text is removed entirely (not replaced): the first input is the first board only.
Every piece of model or game text is sanitised: a response can hold chat control tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from oel.chatlog import is_chat, render_conversation
from oel.knowledge import EMPTY_STORE_TEXT, neutralize
from oel.prompts.render import parse_play, template
from oel.schemas import Episode, Message, Turn

_SLOT = re.compile(r"\{\{(\w+)\}\}")
GAME_MESSAGE = "[GAME] "  # the games' message prefix (oel.games.grid._render)


def clean(text: str) -> str:
    return neutralize(text or "").strip()


def turn_context(turn: Turn) -> dict[str, str] | None:
    """The slot values of a turn: its stored context, else recovered from the logged prompt."""
    return turn.context if turn.context is not None else parse_play(turn.prompt)


def first_input(turn: Turn) -> str:
    """Turn 0's input: its transcript slot without the rules/description text.

    The games put the description first, as its own "[GAME] " message, then the first board
    (oel.games.grid). The paper removes that text entirely, so the first message is dropped when the
    transcript has more than one. A transcript in any other shape is kept whole.
    """
    transcript = (turn_context(turn) or {}).get("transcript", "")
    cut = transcript.find("\n" + GAME_MESSAGE)
    if transcript.startswith(GAME_MESSAGE) and cut >= 0:
        return transcript[cut + 1:]
    return transcript


def turn_inputs(episode: Episode) -> list[str]:
    """What the game told the model before each turn: turn k>0 reads turn k-1's observation."""
    turns = episode.turns
    return [first_input(turns[0])] + [t.observation for t in turns[:-1]] if turns else []


def summary_block(episode: Episode) -> str:
    result = "Success" if episode.success else "Failure"
    last = clean(episode.turns[-1].observation) if episode.turns else ""
    lines = ["Summary:"]
    if last:
        lines.append(f"Last game message: {last}")
    lines += [f"Final Result: {result}", f"Feedback: {clean(episode.feedback)}"]
    return "\n".join(lines)


def render_transcript(episode: Episode, max_rounds: int | None = None) -> str:
    """The episode as "Round{k}_Input/Output" pairs + summary; rounds after `max_rounds` are omitted.
    A chat-log episode is its conversation instead (`Role: content` lines + feedback, oel.chatlog)."""
    if is_chat(episode):
        return render_conversation(episode)
    pairs = list(zip(turn_inputs(episode), episode.turns, strict=True))
    shown = pairs if max_rounds is None else pairs[:max_rounds]
    lines = []
    for k, (given, turn) in enumerate(shown, start=1):
        lines.append(f"Round{k}_Input: {clean(given)}")
        lines.append(f"Round{k}_Output: {clean(turn.response)}")
    if len(shown) < len(pairs):
        lines.append(f"({len(pairs) - len(shown)} later rounds omitted for length)")
    lines.append(summary_block(episode))
    return "\n".join(lines)


def fit_transcript(episode: Episode, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest transcript (fewest rounds omitted) within max_tokens; the summary is always kept."""
    text = render_transcript(episode)
    rounds = len(episode.turns)
    while count_tokens(text) > max_tokens and rounds > 0:
        rounds -= 1
        text = render_transcript(episode, max_rounds=rounds)
    return text


# The extraction prompt versions (params extract.prompt_version), one template file each:
#   v4  prompts/extract.md     1 to max_items items, each a line starting "- EXPERIENCE ITEM:"
#   v3  prompts/extract_v3.md  the reference's free-form version: no item count, no marker format
#   chat prompts/extract_chat.md the domain-neutral one for chat logs: what users want, what went wrong,
#                                as marked items (used for chat episodes whatever prompt_version says)
EXTRACT_TEMPLATES = {"v4": "extract.md", "v3": "extract_v3.md", "chat": "extract_chat.md"}


def template_version(episode: Episode, version: str) -> str:
    """The extraction template an episode is read with: `chat` for chat logs, else params' version."""
    return "chat" if is_chat(episode) else version


def extraction_prompt(previous: str, transcript: str, max_items: int, version: str = "v4") -> list[Message]:
    """One user turn (as the paper sends it): the version's template with its {{slots}} filled."""
    values = {"previous_experience": clean(previous) or EMPTY_STORE_TEXT, "latest_experience": transcript,
              "max_items": str(max_items)}
    # One pass (the play templates' rule): braces in game text or knowledge can never act as slots.
    body = template(EXTRACT_TEMPLATES[version])
    return [Message(role="user", content=_SLOT.sub(lambda m: values[m.group(1)], body))]

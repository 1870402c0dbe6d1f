"""Row schemas of every artifact stages exchange. Validated on write and on read.

Bump SCHEMA_VERSION when a field changes meaning; readers refuse other versions with a clear error.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
MAX_TEXT = 200_000  # characters; a field above this is refused (1 MB lines are hostile or broken)

Text = Annotated[str, Field(max_length=MAX_TEXT)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Row):
    role: Literal["system", "user", "assistant"]
    content: Text


class Turn(_Row):
    index: Annotated[int, Field(ge=0)]
    prompt: list[Message]                 # exactly what the policy saw (chat messages, before templating)
    response: Text                        # raw model output, thinking included
    action: str | None = None             # parsed action, None when nothing parseable was found
    valid: bool                           # the env accepted the action
    observation: Text                     # what the game answered after this turn
    response_tokens: Annotated[int, Field(ge=0)] = 0
    # Template slot values that rendered `prompt`; lets consolidate re-render it with knowledge inserted.
    context: dict[str, Text] | None = None


class Episode(_Row):
    schema_version: Literal[1] = SCHEMA_VERSION
    episode_id: str
    game: str
    seed: int
    split: Literal["user", "extract", "heldout", "imported"]
    round: str
    policy: str
    turns: list[Turn]
    success: bool
    reward: float
    feedback: Text                        # final line for extraction: "Success: ..." / "Failure: ..."
    knowledge_store: int | None = None    # set when played with a store in context (eval --with-knowledge)


class KnowledgeItem(_Row):
    schema_version: Literal[1] = SCHEMA_VERSION
    # The game whose trajectories wrote it; stores are per game. None only in items.jsonl written before
    # stores were per game: consolidate refuses those with one line (rerun extract).
    game: str | None = None
    store: Annotated[int, Field(ge=0)]    # the store's index within its game
    step: Annotated[int, Field(ge=0)]
    source_episode: str
    text: Text
    tokens: Annotated[int, Field(ge=0)]


class DistillRow(_Row):
    schema_version: Literal[1] = SCHEMA_VERSION
    row_id: str
    episode_id: str
    game: str
    turn: Annotated[int, Field(ge=0)]
    store: Annotated[int, Field(ge=0)]    # index among the stores of the row's own `game`
    prompt: list[Message]                 # student: byte-identical to what the policy saw in play
    teacher_prompt: list[Message]         # same render path, knowledge block inserted


class PolicyManifest(_Row):
    schema_version: Literal[1] = SCHEMA_VERSION
    model: str | None = None              # a model spec; set only on the base policy
    parent: str | None = None             # parent policy folder, relative to this folder (e.g. "../r1")
    adapter: str | None = None            # PEFT adapter subfolder, applied on top of the parent
    merged: bool = False                  # True: this folder holds full weights (config.json + safetensors)
    round: str = "base"

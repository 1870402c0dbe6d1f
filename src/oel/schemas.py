"""Row schemas of every artifact stages exchange. Validated on write and on read.

Bump SCHEMA_VERSION when a field changes meaning; readers refuse other versions with a clear error.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

SCHEMA_VERSION = 1
MAX_TEXT = 200_000  # characters; a field above this is refused (1 MB lines are hostile or broken)

Text = Annotated[str, Field(max_length=MAX_TEXT)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Optional fields left out of the dump when None, so rows without them stay byte-identical to before.
    _omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_optionals(self, handler) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Message(_Row):
    # `tool` and the three optional fields come from chat logs (oel.chatlog); game prompts never use them.
    role: Literal["system", "user", "assistant", "tool"]
    content: Text
    tool_calls: list[dict[str, Any]] | None = None  # assistant: OpenAI tool calls, as logged
    tool_call_id: str | None = None                 # tool: the call this message answers
    name: str | None = None                         # tool (or function) name
    _omit_none = ("tool_calls", "tool_call_id", "name")


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
    # Chat logs (oel.chatlog): the assistant's tool calls and its token ids, when the log has them.
    tool_calls: list[dict[str, Any]] | None = None
    token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    _omit_none = ("tool_calls", "token_ids")


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
    # A conversation read from MLflow traces (collect.source: traces): the traces it was built from, in order, so
    # what a round learned from can be traced back to the requests (and a deleted request to the rounds it fed).
    trace_ids: list[str] | None = None
    _omit_none = ("trace_ids",)


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


class TrainSummary(BaseModel):
    """What is read back of models/<r>/train_summary.json (distill writes more): whether distill trained, and
    if not why. The gate and eval read it: an untrained round's policy is its start policy."""

    model_config = ConfigDict(extra="allow")
    trained: bool = True
    skipped_reason: str | None = None


class HeadroomVerdict(_Row):
    """reports/<r>/headroom.json: the headroom stage's verdict (oel.headroom), read by distill and oel.rounds."""

    round: str
    start_policy: str
    headroom: bool           # distill trains only when true (or distill.require_headroom is off)
    reason: str
    episodes_per_game: int
    stores: dict[str, int] = {}
    # "<game> store <k> <metric>" -> the teacher's improvement over the plain start policy (oel.paired fields)
    checks: dict[str, dict] = {}
    better: list[str] = []   # the keys of `checks` where the teacher is better beyond noise

"""The round lifecycle's records on disk, validated at every read: a decision the next round is planned from
must never be half-read, and a hand-edited or damaged file is one `error:` line naming it.

reports/<r>/promotion.json   the gate's decision for round r (Decision), with every metric check it made, and
                             any later force-promotion or rollback of r appended to `events`
reports/<r>/eval.json        eval's breakdown; the lifecycle reads its `heldout` and `ood` blocks (EvalView)
models/<r>/train_summary.json whether distill trained (oel.schemas.TrainSummary): a round without headroom is not
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from oel.artifacts import read_json, write_json

CHAMPION, CHALLENGER, UNTRAINED, ROLLED_BACK = "champion", "challenger", "untrained", "rolled_back"
METRICS = ("pass_rate", "invalid_action_rate", "tokens_per_turn", "ood_instruction_pass", "ood_loglik")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Check(_Record):
    """One headline metric of one game (or `ood`), candidate vs champion on the same held-out units."""

    game: str
    metric: Literal[METRICS]  # type: ignore[valid-type]
    test: str
    pairs: Annotated[int, Field(ge=0)]
    candidate: float
    champion: float
    worse_by: float          # absolute for rates, relative (x - 1) for tokens per turn and OOD log-likelihood
    margin: float
    p_value: float | None = None
    ci_low: float | None = None
    discordant: int | None = None
    blocked: bool
    note: str = ""


class Event(_Record):
    """After the gate: a person's force-promotion or rollback, with who-said-why, or the canary's verdict on the
    served champion (its users' ratings: kept, or rolled back)."""

    kind: Literal["force", "rollback", "canary"]
    at: str
    reason: str
    champion_before: str
    champion_after: str


class Decision(_Record):
    round: str
    from_: str = Field(alias="from")
    policy: Literal["gate", "always"]
    alpha: float
    champion_before: str
    decision: Literal["champion", "challenger", "untrained", "rolled_back"]
    champion_after: str
    reason: str
    checks: list[Check] = []
    blocked_by: list[str] = []     # "<game> <metric>" of every check that blocked
    pass_rate: float | None = None
    trained: bool = True
    events: list[Event] = []

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class HeldoutBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    pass_rate: float
    episodes: int


class OodBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    instruction_pass: float
    source: str = "probe"
    loglik_nats_per_token: float | None = None
    prompts: int | None = None
    prompt_ids: list[str] | None = None
    failed: list[str] | None = None
    flag: bool = False


class EvalView(BaseModel):
    """What the lifecycle reads of eval.json; the rest of the breakdown is eval's and the report's."""

    model_config = ConfigDict(extra="allow")
    heldout: dict[str, HeldoutBlock] | None = None
    ood: OodBlock | None = None
    log_round: bool = False


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Level(_Open):
    """One metric block of eval.json (oel.metrics.episode_metrics): the fields the report prints."""

    pass_rate: float
    pass_ci_low: float
    pass_ci_high: float
    passed: int
    episodes: int
    invalid_action_rate: float
    response_tokens_per_turn: float
    tokens_per_game: float
    turns_per_game: float


class Teacher(_Open):
    mean: dict[str, Level]


class GapSide(_Open):
    kl_mean: float
    kl_ci_low: float
    kl_ci_high: float
    response_tokens_mean: float


class Gap(_Open):
    start_policy: str
    prompts: int
    start: GapSide
    after: GapSide
    reduction_mean: float
    reduction_ci_low: float
    reduction_ci_high: float


class ReportView(_Open):
    """eval.json as the report reads it: every block it prints has the shape it prints, so a damaged file is
    one line naming it, not a traceback halfway through the report."""

    heldout: dict[str, Level] | None = None
    teacher: Teacher | None = None
    teacher_plain: dict[str, Level] | None = None
    headroom: dict[str, float] | None = None
    ood: OodBlock | None = None
    ood_start: OodBlock | None = None
    gap: Gap | None = None


def read_decision(path) -> Decision:
    return read_json(path, Decision)


def write_decision(path, decision: Decision) -> None:
    write_json(path, decision.dump())


def read_eval(path) -> EvalView:
    return read_json(path, EvalView)

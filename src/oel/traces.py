"""MLflow traces of play and extraction, reached only through oel.tracking.

A stage writes its outputs first, then hands its records here: one trace per episode (a span per turn:
prompt, response, parsed action, observation, tokens) and one per extraction call. Traces are built from
those records after the fact, so tracing cannot change what a stage computes (tests/integration/
test_traces.py runs collect with tracing on and off and compares the bytes).

Sessions: a trace's `mlflow.trace.session` is the episode id, so an episode's play trace and the
extraction calls that read it form one session in the UI (Traces -> Sessions).

Timing: play is batched in lockstep and the records hold no clock, so an episode's root span is the
play call it ran in (start and end of the stage's play()), and its turn spans split that window in equal
slices, in turn order; the `oel.timing` attribute says so. Token charts are exact (response tokens).

Reading a deployment's traffic back (collect.source: traces, `read_exchanges` and `conversations`): the MLflow AI
Gateway (mlflow 3.17, mlflow/gateway/tracing_utils.py `maybe_traced_gateway_call`) records each chat request as
one trace in its endpoint's experiment: the root span `gateway/<endpoint>` has the request body as its inputs
(`messages`, `temperature`, ...; `model` removed) and the response as its outputs (`choices[].message`); a
streamed response is aggregated into the same shape by `aggregate_chat_stream_chunks`. A request that failed
upstream (an engine killed mid-request) ends its trace in state ERROR with no outputs. A conversation is found
from its messages: a chat client resends the history, so a later request's messages extend an earlier request's
messages plus its reply. The gateway itself sets no session id; a trace that carries `mlflow.trace.session`
(`oel serve` sets it from the request's X-Conversation-Id header, oel.online.gateway_app) is only chained with
requests of its own session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from oel.config import TrackingParams
from oel.errors import UserError
from oel.schemas import Episode, Turn

log = logging.getLogger(__name__)

Window = tuple[int, int]  # start, end in ns since the epoch
TIMING = "root span = the batched play call; turn spans = equal slices of it (lockstep turns are not timed)"
SESSION = "mlflow.trace.session"  # TraceMetadataKey.TRACE_SESSION, what update_current_trace(session_id=) sets
FEEDBACK = "user_feedback"  # the assessment a served request's rating or correction is logged under


def pick(records: Sequence[Any], cfg: TrackingParams) -> list[Any]:
    """all: every record; sample: `trace_sample` of them spread evenly over the list; off: none."""
    if cfg.traces == "off":
        return []
    if cfg.traces == "all" or len(records) <= cfg.trace_sample:
        return list(records)
    step = len(records) / cfg.trace_sample
    return [records[int(i * step)] for i in range(cfg.trace_sample)]


def episode_tags(stage: str, ep: Episode) -> dict[str, str]:
    outcome = "success" if ep.success else "failure"
    store = "none" if ep.knowledge_store is None else str(ep.knowledge_store)
    return {"oel.round": ep.round, "oel.stage": stage, "oel.game": ep.game, "oel.seed": str(ep.seed),
            "oel.policy": ep.policy, "oel.split": ep.split, "oel.store": store, "oel.outcome": outcome}


def log_episodes(mlflow: Any, stage: str, episodes: Sequence[Episode], window: Window,
                 cfg: TrackingParams) -> int:
    """One trace per picked episode under the active run; returns how many were written."""
    chosen = pick(episodes, cfg)
    for ep in chosen:
        _episode_trace(mlflow, stage, ep, window)
    _flush(mlflow, len(chosen), f"{stage} episodes")
    return len(chosen)


def _episode_trace(mlflow: Any, stage: str, ep: Episode, window: Window) -> None:
    from mlflow.entities import SpanType

    start, end = window
    root = mlflow.start_span_no_context(
        f"{stage} {ep.episode_id}", span_type=SpanType.AGENT, start_time_ns=start,
        inputs={"game": ep.game, "seed": ep.seed, "split": ep.split, "policy": ep.policy,
                "store": ep.knowledge_store},
        attributes={"oel.timing": TIMING}, tags=episode_tags(stage, ep),
        metadata={SESSION: ep.episode_id})
    slice_ns = max((end - start) // max(len(ep.turns), 1), 0)
    for turn in ep.turns:
        t0 = start + turn.index * slice_ns
        _turn_span(mlflow, root, turn, t0, t0 + slice_ns)
    root.end(outputs={"success": ep.success, "reward": ep.reward, "turns": len(ep.turns), "feedback": ep.feedback},
             end_time_ns=max(end, start))


def _turn_span(mlflow: Any, root: Any, turn: Turn, start: int, end: int) -> None:
    from mlflow.entities import SpanType

    span = mlflow.start_span_no_context(
        f"turn {turn.index}", span_type=SpanType.LLM, parent_span=root, start_time_ns=start,
        inputs={"messages": [m.model_dump() for m in turn.prompt]},
        attributes={"oel.action": turn.action or "", "oel.valid": turn.valid, "oel.observation": turn.observation,
                    "oel.response_tokens": turn.response_tokens,
                    "mlflow.chat.tokenUsage": _usage(turn.response_tokens)})
    span.end(outputs={"choices": [{"message": {"role": "assistant", "content": turn.response}}],
                      "action": turn.action, "valid": turn.valid, "observation": turn.observation},
             end_time_ns=end)


def log_extraction_calls(mlflow: Any, round_id: str, calls: Sequence[dict[str, Any]], window: Window,
                         cfg: TrackingParams) -> int:
    """One trace per picked extraction call, in the session of the episode it read.

    A call is {game, store, step, episode_id, seed, policy, prompt: [Message], response, tokens, items}."""
    chosen = pick(calls, cfg)
    start, end = window
    for call in chosen:
        _call_trace(mlflow, round_id, call, start, end)
    _flush(mlflow, len(chosen), "extraction calls")
    return len(chosen)


def _call_trace(mlflow: Any, round_id: str, call: dict[str, Any], start: int, end: int) -> None:
    from mlflow.entities import SpanType

    tags = {"oel.round": round_id, "oel.stage": "extract", "oel.game": call["game"], "oel.seed": str(call["seed"]),
            "oel.policy": call["policy"], "oel.store": str(call["store"]), "oel.step": str(call["step"]),
            "oel.outcome": f"{call['items']} items" if call["items"] else "no item"}
    span = mlflow.start_span_no_context(
        f"extract {call['game']} store {call['store']} step {call['step']}", span_type=SpanType.LLM,
        start_time_ns=start, inputs={"messages": [m.model_dump() for m in call["prompt"]]},
        attributes={"oel.timing": "the extract stage's generate loop (calls are batched per step)",
                    "oel.source_episode": call["episode_id"], "mlflow.chat.tokenUsage": _usage(call["tokens"])},
        tags=tags, metadata={SESSION: call["episode_id"]})
    span.end(outputs={"choices": [{"message": {"role": "assistant", "content": call["response"]}}],
                      "items": call["items"]}, end_time_ns=max(end, start))


def _usage(output_tokens: int) -> dict[str, int]:
    # Prompt tokens are not recorded in the episode files; the charts count what the policy generated.
    return {"input_tokens": 0, "output_tokens": output_tokens, "total_tokens": output_tokens}


def _flush(mlflow: Any, n: int, what: str) -> None:
    if n:
        mlflow.flush_trace_async_logging()
        log.info("traced %d %s to MLflow", n, what)


# ---- reading a deployment's traffic --------------------------------------------------------------------------

PAGE = 500  # traces per search call
SKIPS = ("failed", "no_response", "not_chat")  # why a trace in the window is not learned from


class TracesError(UserError, ValueError):
    """The deployment experiment or its traffic cannot be read; one line naming the cause and the fix."""


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ChatRequest(_Loose):
    """The root span's inputs: an OpenAI chat-completions request body."""
    messages: list[dict[str, Any]] = Field(min_length=1)


class ChatChoice(_Loose):
    message: dict[str, Any]


class ChatResponse(_Loose):
    """The root span's outputs: an OpenAI chat-completions response (a stream's, aggregated)."""
    choices: list[ChatChoice] = Field(min_length=1)


class Feedback(BaseModel):
    """A `user_feedback` assessment as read back."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    assessment_id: str
    created_ms: int
    value: Any = None
    rationale: str | None = None
    overrides: str | None = None


class Exchange(BaseModel):
    """One chat request the gateway answered: what was sent, the reply, the feedback logged on it."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    trace_id: str
    end_ms: int
    session: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    reply: dict[str, Any]
    feedback: list[Feedback] = []


class Conversation(BaseModel):
    """A chain of exchanges: the last one's messages plus its reply is the whole conversation."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    trace_ids: list[str]
    messages: list[dict[str, Any]]
    feedback: Feedback | None = None


def read_exchanges(client: Any, experiment: str, since_ms: int | None, until_ms: int
                   ) -> tuple[list[Exchange], dict[str, int]]:
    """Every trace of `experiment` that ended in (since_ms, until_ms], as exchanges in _order, and
    how many were skipped by reason (SKIPS). Feedback logged after `until_ms` is left out, so the same window
    reads the same whatever is added to the store later."""
    exchanges, skipped = [], dict.fromkeys(SKIPS, 0)
    for trace in _window(client, experiment, since_ms, until_ms):
        ex, why = exchange(trace, until_ms)
        if ex is not None and not ((since_ms is None or ex.end_ms > since_ms) and ex.end_ms <= until_ms):
            continue  # the store's filter already said so; kept exact here whatever the store rounds
        if ex is None:
            skipped[why] += 1
        else:
            exchanges.append(ex)
    exchanges.sort(key=_order)
    return exchanges, skipped


class Answer(BaseModel):
    """A request the gateway answered, as a canary is judged: which version answered, and how its user rated it."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    trace_id: str
    served: str          # the engine's name for the version (the response's `model`)
    good: bool | None    # the latest rating above 0; None: not rated (or in words only)


def read_answers(client: Any, experiment: str, since_ms: int | None, until_ms: int) -> list[Answer]:
    """Every answered request of `experiment` in (since_ms, until_ms] whose response names its version, whatever
    the reply says: a blank answer its user rated bad is what a canary must count."""
    answers = []
    for trace in _window(client, experiment, since_ms, until_ms):
        root = _root_span(trace)
        served = root.outputs.get("model") if root is not None and isinstance(root.outputs, dict) else None
        if not isinstance(served, str):
            continue  # failed before answering, or not a chat response
        rated = latest_feedback(_feedbacks(trace, until_ms))
        answers.append(Answer(trace_id=trace.info.trace_id, served=served, good=good(rated)))
    return answers


def _window(client: Any, experiment: str, since_ms: int | None, until_ms: int) -> Iterator[Any]:
    """The experiment's traces that ended in (since_ms, until_ms], page by page, oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TracesError(f"experiment {experiment!r}: not in the tracking store; it is where the gateway records "
                          "(serve.experiment): serve traffic first (oel serve), or fix rounds.<r>.collect.experiment")
    window = f"trace.end_time_ms <= {until_ms}" + ("" if since_ms is None else f" AND trace.end_time_ms > {since_ms}")
    token = None
    while True:
        page = client.search_traces(locations=[found.experiment_id], filter_string=window, max_results=PAGE,
                                    order_by=["timestamp_ms ASC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def exchange(trace: Any, until_ms: int) -> tuple[Exchange | None, str]:
    """A trace as an Exchange, or (None, why): failed, no_response (no usable reply) or not_chat."""
    try:
        return _exchange(trace, until_ms)
    except ValidationError:  # a trace of another shape in the experiment: not a chat request the gateway answered
        return None, "not_chat"


def _exchange(trace: Any, until_ms: int) -> tuple[Exchange | None, str]:
    info = trace.info
    state = getattr(info.state, "value", info.state)
    root = _root_span(trace)
    if root is None:
        return None, "no_response"
    try:
        request = ChatRequest.model_validate(root.inputs)
    except ValidationError:
        return None, "not_chat"
    if state != "OK" or getattr(root.status.status_code, "value", root.status.status_code) == "ERROR":
        return None, "failed"
    try:
        reply = ChatResponse.model_validate(root.outputs).choices[0].message
    except ValidationError:
        return None, "no_response"
    if blank(reply):
        return None, "no_response"
    end_ms = info.request_time + (info.execution_duration or 0)
    feedback = _feedbacks(trace, until_ms)
    return Exchange(trace_id=info.trace_id, end_ms=end_ms, session=info.trace_metadata.get(SESSION),
                    messages=request.messages, reply=reply, feedback=feedback), ""


def _root_span(trace: Any) -> Any | None:
    return next((span for span in trace.data.spans if span.parent_id is None), None)


def _feedbacks(trace: Any, until_ms: int) -> list[Feedback]:
    """The trace's `user_feedback` assessments logged by `until_ms`."""
    return [fb for a in trace.info.assessments if (fb := _feedback(a, until_ms)) is not None]


def _feedback(assessment: Any, until_ms: int) -> Feedback | None:
    if assessment.name != FEEDBACK or assessment.feedback is None or (assessment.create_time_ms or 0) > until_ms:
        return None
    return Feedback(assessment_id=assessment.assessment_id, created_ms=assessment.create_time_ms or 0,
                    value=assessment.feedback.value, rationale=assessment.rationale, overrides=assessment.overrides)


def conversations(exchanges: Sequence[Exchange]) -> list[Conversation]:
    """Exchanges chained into conversations, in order of their first exchange.

    An exchange continues the conversation whose messages-plus-reply its own messages start with (the longest
    such, then the earliest); otherwise it starts one. Within a session only that session's conversations are
    candidates. Its feedback is the latest on any of its traces, overridden ones aside."""
    chains: list[list[Exchange]] = []
    ends: dict[tuple[Any, ...], list[int]] = {}  # (session, messages-plus-reply keys so far) -> chains ending so
    for ex in sorted(exchanges, key=_order):
        sent = tuple(_key(m) for m in ex.messages)
        found = next((ends[(ex.session, sent[:n])] for n in range(len(sent) - 1, 0, -1)
                      if ends.get((ex.session, sent[:n]))), None)
        if found:
            index = found.pop(0)  # the earliest; it ends differently now
            chains[index].append(ex)
        else:
            index = len(chains)
            chains.append([ex])
        ends.setdefault((ex.session, (*sent, _key(ex.reply))), []).append(index)
        ends[(ex.session, (*sent, _key(ex.reply)))].sort()
    return [Conversation(trace_ids=[e.trace_id for e in chain], messages=[*chain[-1].messages, chain[-1].reply],
                         feedback=latest_feedback([fb for e in chain for fb in e.feedback])) for chain in chains]


def _order(ex: Exchange) -> tuple[int, int, str]:
    """End time, then message count, then trace id. A trace's end is whole milliseconds, so two requests of one
    conversation can end in the same one (a fast engine, a client that answers at once); the continuation always
    sends more messages than the request it continues, so it sorts after it, never before (by trace id, half the
    time, which split the conversation in two)."""
    return ex.end_ms, len(ex.messages), ex.trace_id


def blank(message: dict[str, Any]) -> bool:
    """An assistant message that says nothing: no text but whitespace, no tool call (a tiny model's "\\n\\n")."""
    content = message.get("content")
    return not (content.strip() if isinstance(content, str) else content) and not message.get("tool_calls")


def latest_feedback(feedback: Sequence[Feedback]) -> Feedback | None:
    overridden = {fb.overrides for fb in feedback if fb.overrides}
    live = [fb for fb in feedback if fb.assessment_id not in overridden]
    return max(live, key=lambda fb: (fb.created_ms, fb.assessment_id), default=None)


def good(fb: Feedback | None) -> bool | None:
    """A rating as good (above 0) or not; None when there is none (no feedback, or words only): the reading of a
    chat log's rating (success = rating > 0)."""
    value = None if fb is None else fb.value
    if isinstance(value, dict):
        value = value.get("rating", value.get("score"))
    if isinstance(value, bool):
        return value
    return value > 0 if isinstance(value, int | float) else None


def _key(message: dict[str, Any]) -> tuple[Any, ...]:
    """What a client's resent copy of a message keeps: role, text and tool calls (not ids, nulls or extras)."""
    role = str(message.get("role"))
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "\n".join(p.get("text", repr(p)) if isinstance(p, dict) else repr(p) for p in content)
    calls = message.get("tool_calls") or []
    return ({"developer": "system", "function": "tool"}.get(role, role), str(content),
            tuple(_call_key(c) for c in calls) if isinstance(calls, list) else (repr(calls),))


def _call_key(call: Any) -> tuple[str, str]:
    fn = call.get("function") if isinstance(call, dict) else None
    return (str(fn.get("name")), str(fn.get("arguments"))) if isinstance(fn, dict) else (repr(call), "")

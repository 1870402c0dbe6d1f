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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from oel.config import TrackingParams
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

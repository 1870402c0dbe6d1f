"""A round from traffic, in process, on a real MLflow store: the traces are written by the MLflow AI Gateway's own
recorder (mlflow.gateway.tracing_utils.maybe_traced_gateway_call, the function gateway_api.py wraps every chat
request in, with its stream aggregator and the gateway's request and response types); only the upstream engine is
a coroutine here, so no server runs. A conversation with an id is recorded inside mlflow.tracing.context(session_id)
as `oel serve`'s gateway app does; feedback is mlflow.log_feedback. Then collect reads the round's window.

The PII test runs collect, extract, consolidate and distill on conversations full of e-mails, phone and card numbers
and a deny-listed name, and finds none of them in data/ (trajectories, knowledge, the training rows), models/ or
MLflow params.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import mlflow
import pytest
import yaml
from mlflow.gateway.config import GatewayRequestType
from mlflow.gateway.schemas import chat
from mlflow.gateway.tracing_utils import aggregate_chat_stream_chunks, maybe_traced_gateway_call
from mlflow.store.tracking.gateway.entities import GatewayEndpointConfig

from oel.artifacts import read_jsonl
from oel.paths import ProjectPaths
from oel.schemas import Episode
from oel.stages import collect, consolidate, distill, extract
from oel.stages._common import stage_main
from oel.traces import FEEDBACK
from oel.tracking import resolve_uri

DEPLOY = "oel-deployment"


class Gateway:
    """The gateway's recording of chat requests to an endpoint whose engine answers `replies` in turn."""

    def __init__(self, root):
        mlflow.set_tracking_uri(resolve_uri("sqlite:///mlruns/mlflow.db", root))
        found = mlflow.get_experiment_by_name(DEPLOY)
        experiment = found.experiment_id if found else mlflow.create_experiment(
            DEPLOY, artifact_location=(root / "mlruns" / "artifacts").as_uri())
        self.endpoint = GatewayEndpointConfig(endpoint_id="ep-1", endpoint_name="oel", experiment_id=experiment,
                                              usage_tracking=True)

    def chat(self, messages, reply=None, *, tool_calls=None, stream=False, die=False, session=None):
        """One request; returns its trace id. die: the engine is killed mid-request."""
        payload = chat.RequestPayload(messages=messages, temperature=0.7, stream=stream or None)
        message = {"role": "assistant", "content": reply, "tool_calls": tool_calls}

        async def answer(p):
            if die:
                raise ConnectionError("engine connection lost")
            return chat.ResponsePayload(id="c", created=1, model="oel-base", usage={},
                                        choices=[{"index": 0, "message": message, "finish_reason": "stop"}])

        async def answer_stream(p):
            for k, piece in enumerate((reply[:3], reply[3:])):
                if die and k:
                    raise ConnectionError("engine connection lost")
                yield chat.StreamResponsePayload(id="s", created=1, model="oel-base", choices=[
                    {"index": 0, "delta": {"role": "assistant" if k == 0 else None, "content": piece},
                     "finish_reason": "stop" if k else None}])

        async def call():
            if stream:
                traced = maybe_traced_gateway_call(answer_stream, self.endpoint, {}, request_headers={},
                                                   output_reducer=aggregate_chat_stream_chunks,
                                                   request_type=GatewayRequestType.UNIFIED_CHAT)
                async for _ in traced(payload):
                    pass
            else:
                await maybe_traced_gateway_call(answer, self.endpoint, {}, request_headers={},
                                                request_type=GatewayRequestType.UNIFIED_CHAT)(payload)
            return mlflow.get_last_active_trace_id()

        with mlflow.tracing.context(session_id=session) if session else _nothing():
            try:
                return asyncio.run(call())
            except ConnectionError:
                return mlflow.get_last_active_trace_id()

    def feedback(self, trace_id, value, rationale=None):
        mlflow.flush_trace_async_logging()
        return mlflow.log_feedback(trace_id=trace_id, name=FEEDBACK, value=value, rationale=rationale)

    @staticmethod
    def now() -> datetime:
        mlflow.flush_trace_async_logging()
        time.sleep(0.01)
        moment = datetime.now(UTC)
        time.sleep(0.01)
        return moment


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def u(text):
    return {"role": "user", "content": text}


def a(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def declare(project, until: datetime, since: datetime | None = None, **sections) -> object:
    window = {"source": "traces", "experiment": DEPLOY, "until": until.isoformat()}
    if since is not None:
        window["since"] = since.isoformat()
    raw = {"model": {"name": "tiny-random", "dtype": "float32"},
           "rounds": {"r1": {"from": "base", "collect": window}},
           "collect": {"import_heldout_fraction": 0.0},
           **sections}
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params_file


def test_a_round_from_gateway_traces_is_its_conversations_and_a_rerun_is_byte_identical(project):
    gw = Gateway(project)
    before = gw.chat([u("too early")], "ignored")
    start = gw.now()
    system = {"role": "system", "content": "You are a support agent."}
    # A multi-turn conversation: the client resends the history, replies as it got them.
    t1 = gw.chat([system, u("Where is order 42?")], "It shipped on 2 May.")
    t2 = gw.chat([system, u("Where is order 42?"), a("It shipped on 2 May."), u("Answer shorter.")], "2 May.")
    gw.feedback(t2, False, "still too long")
    # The engine is killed mid-request on the next turn: the request failed, no partial row.
    dead = gw.chat([system, u("Where is order 42?"), a("It shipped on 2 May."), u("Answer shorter."), a("2 May."),
                    u("And order 43?")], "unused", die=True)
    # Streamed, with a conversation id; a tool call passed through and its result sent back.
    call = [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]
    s1 = gw.chat([u("Weather in Oslo?")], None, tool_calls=call, session="conv-7")
    s2 = gw.chat([u("Weather in Oslo?"), a(None, tool_calls=call),
                  {"role": "tool", "tool_call_id": "call_1", "content": "rain, 4 C"}],
                 "Rain, 4 degrees.", stream=True, session="conv-7")
    gw.feedback(s2, 1.0)
    cut = gw.chat([u("Tell me a story")], "Once upon", stream=True, die=True)  # killed mid-stream
    until = gw.now()
    params_file = declare(project, until, since=start)

    summary = stage_main("collect", collect.run, "r1", params_file, project)
    paths = ProjectPaths(project).round("r1")
    rows = read_jsonl(paths.trajectories, Episode)
    assert [r.trace_ids for r in rows] == [[t1, t2], [s1, s2]]
    assert len({before, dead, cut, t1, t2, s1, s2}) == 7   # every request was traced, each on its own
    assert summary["traces"] == 4 and summary["skipped"] == {"failed": 2, "no_response": 0, "not_chat": 0,
                                                             "unreadable": 0}

    order = rows[0]
    assert order.episode_id == t1 and order.game == "chat" and order.split == "imported"
    assert [t.response for t in order.turns] == ["It shipped on 2 May.", "2 May."]
    assert order.turns[0].observation == "Answer shorter."   # the implicit signal: the user's next message
    assert order.reward == 0.0 and not order.success and order.feedback == "still too long"
    assert order.turns[1].prompt[0].content == "You are a support agent."

    weather = rows[1]
    assert weather.turns[0].tool_calls == call and weather.turns[0].observation == "rain, 4 C"
    assert weather.turns[1].response == "Rain, 4 degrees." and weather.reward == 1.0 and weather.success

    # Later traffic and late feedback on a request of the window change nothing in this round.
    first = paths.trajectories.read_bytes()
    gw.feedback(t1, True, "changed my mind")
    later = gw.chat([system, u("Where is order 42?"), a("It shipped on 2 May."), u("Answer shorter."),
                     a("2 May."), u("Thanks!")], "You're welcome.")
    gw.now()
    stage_main("collect", collect.run, "r1", params_file, project)
    assert paths.trajectories.read_bytes() == first

    # The next window starts at this one's until and holds the later request: its conversation from t1 on.
    declare(project, gw.now(), since=until)
    stage_main("collect", collect.run, "r1", params_file, project)
    (next_round,) = read_jsonl(paths.trajectories, Episode)
    assert next_round.trace_ids == [later] and len(next_round.turns) == 3


PII = {
    "emails": ["ada.lovelace@example.com", "b.smith@corp-mail.org"],
    "phones": ["+1 (415) 555-0132", "020 7946 0958"],
    "cards": ["4111 1111 1111 1111", "5500-0000-0000-0004"],
    "name": ["Grace Hopper"],
}
SECRETS = [v for values in PII.values() for v in values] + ["4111111111111111", "5550132", "79460958"]


def test_no_personal_data_reaches_trajectories_knowledge_training_rows_models_or_mlflow_params(project):
    gw = Gateway(project)
    start = gw.now()
    for k in range(6):
        email, phone, card = PII["emails"][k % 2], PII["phones"][k % 2], PII["cards"][k % 2]
        ask = u(f"I'm Grace Hopper ({email}, {phone}). Charge card {card}, please. Request {k}.")
        first = gw.chat([ask], f"Done, Grace Hopper: card {card} charged; receipt sent to {email}.")
        gw.feedback(first, k % 2 == 0, f"call me on {phone} instead")
        gw.chat([ask, a(f"Done, Grace Hopper: card {card} charged; receipt sent to {email}."),
                 u(f"Also use {PII['emails'][(k + 1) % 2]}.")], "Noted.", stream=True)
    params_file = declare(project, gw.now(), since=start,
                          collect={"import_heldout_fraction": 0.0, "scrub": {"deny": {"PERSON": ["Grace Hopper"]}}},
                          extract={"stores": 1, "steps": 2, "max_knowledge_tokens": 64, "max_item_tokens": 32,
                                   "sampling": {"max_new_tokens": 12}},
                          consolidate={"max_rows": 8},
                          distill={"steps": 2, "batch_size": 2, "save_every": 1, "top_k": 8,
                                   "sampling": {"max_new_tokens": 6}})

    summary = stage_main("collect", collect.run, "r1", params_file, project)
    assert summary["episodes"] == 6 and summary["scrubbed"] == {"CARD": 2, "EMAIL": 2, "PERSON": 1, "PHONE": 2}
    stage_main("extract", extract.run, "r1", params_file, project)
    stage_main("consolidate", consolidate.run, "r1", params_file, project)
    stage_main("distill", distill.run, "r1", params_file, project)

    paths = ProjectPaths(project).round("r1")
    assert paths.distill_rows.read_text().strip() and paths.items.is_file() and paths.model.is_dir()
    written = {p: p.read_bytes().decode("utf-8", "ignore") for folder in ("data", "models")
               for p in (project / folder).rglob("*") if p.is_file()}
    assert paths.trajectories in written and paths.distill_rows in written
    for path, text in written.items():
        leaked = [s for s in SECRETS if s.casefold() in text.casefold()]
        assert not leaked, f"{path} holds {leaked}"
    assert "[EMAIL_1]" in written[paths.trajectories] and "[PERSON_1]" in written[paths.distill_rows]

    client = mlflow.MlflowClient()
    oel = client.get_experiment_by_name("oel")
    runs = client.search_runs([oel.experiment_id])
    assert {r.info.run_name for r in runs} >= {"collect@r1", "extract@r1", "consolidate@r1", "distill@r1"}
    params = " ".join(f"{k}={v}" for r in runs for k, v in r.data.params.items())
    assert "collect.scrub.deny.PERSON=1 term (not shown)" in params
    assert not [s for s in SECRETS if s.casefold() in params.casefold()]
    (collected,) = [r for r in runs if r.info.run_name == "collect@r1"]
    assert {k: v for k, v in collected.data.metrics.items() if k.startswith("scrubbed/")} == {
        "scrubbed/CARD": 2, "scrubbed/EMAIL": 2, "scrubbed/PERSON": 1, "scrubbed/PHONE": 2}  # counts, never values


def test_a_window_that_holds_no_answered_request_is_one_error(project):
    gw = Gateway(project)
    start = gw.now()
    gw.chat([u("hello")], "unused", die=True)
    params_file = declare(project, gw.now(), since=start)
    with pytest.raises(collect.ArtifactError, match=r"holds no answered chat request .*skipped: failed 1"):
        stage_main("collect", collect.run, "r1", params_file, project)
    assert not ProjectPaths(project).round("r1").trajectories.exists()

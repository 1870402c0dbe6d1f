"""The conversation scope around the MLflow server's app: what the gateway's trace of a request sees as its session.
A stand-in app records the trace metadata MLflow would give a trace started where it runs (and in a task it
starts, as a streamed response's trace is)."""

from __future__ import annotations

import asyncio
import json

from mlflow.tracing.context import get_configured_trace_metadata

from oel.online.gateway_app import ConversationScope
from oel.traces import SESSION


class Recorder:
    def __init__(self) -> None:
        self.seen: list[dict | None] = []

    async def __call__(self, scope, receive, send) -> None:
        self.seen.append(get_configured_trace_metadata())

        async def later() -> None:  # a stream's body runs in a task of its own
            self.seen.append(get_configured_trace_metadata())

        await asyncio.create_task(later())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(path: str, headers: dict[str, str]) -> tuple[Recorder, list[dict]]:
    app, sent = Recorder(), []
    scope = {"type": "http", "path": path, "method": "POST",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(ConversationScope(app)(scope, receive, send))
    return app, sent


def test_the_conversation_id_is_the_session_of_every_trace_the_request_starts():
    app, sent = call("/gateway/mlflow/v1/chat/completions", {"X-Conversation-Id": "conv-42"})
    assert app.seen == [{SESSION: "conv-42"}, {SESSION: "conv-42"}]
    assert sent[0]["status"] == 200


def test_without_the_header_or_outside_the_gateway_nothing_changes():
    assert call("/gateway/mlflow/v1/chat/completions", {})[0].seen == [None, None]
    assert call("/ajax-api/2.0/mlflow/runs/search", {"X-Conversation-Id": "conv-42"})[0].seen == [None, None]


def test_a_conversation_id_that_cannot_be_a_session_is_refused_before_the_gateway():
    app, sent = call("/gateway/mlflow/v1/chat/completions", {"X-Conversation-Id": "x' OR '1'='1"})
    assert app.seen == []
    assert sent[0]["status"] == 400
    body = json.loads(sent[1]["body"])
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and "X-Conversation-Id" in body["message"]

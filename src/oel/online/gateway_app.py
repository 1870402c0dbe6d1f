"""The MLflow server's app as `oel serve` runs it: a gateway request's conversation id becomes its trace's session.

MLflow 3.17.2's AI Gateway writes into each trace's metadata the endpoint, the request type, the caller
(X-MLflow-Gateway-Caller or the User-Agent's product) and the authenticated user, and nothing else from the request
(mlflow.gateway.tracing_utils.maybe_traced_gateway_call); no header or body field sets `mlflow.trace.session`. Every
trace started inside mlflow.tracing.context(session_id=...) does carry it (the span processor merges that scope's
metadata, mlflow.tracing.processor.base_mlflow). So a /gateway/ request with the X-Conversation-Id header is handled
inside that scope, streaming included (the stream's trace starts in a task that inherits the scope). Nothing else
changes: no request or response is read or rewritten, and a request without the header is traced as MLflow traces
it. Served by oel.online.gateway_server.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.server.fastapi_app import app as mlflow_app

from oel.online import conversation

GATEWAY_PREFIX = "/gateway/"


class ConversationScope:
    """ASGI middleware around MLflow's app: X-Conversation-Id -> the session of the request's trace."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        value = _header(scope, conversation.HEADER) if _is_gateway(scope) else None
        if value is None:
            await self.app(scope, receive, send)
            return
        if (problem := conversation.check(value)) is not None:
            await _refuse(send, problem)
            return
        with mlflow.tracing.context(session_id=value):
            await self.app(scope, receive, send)


def _is_gateway(scope: dict) -> bool:
    return scope.get("type") == "http" and scope.get("path", "").startswith(GATEWAY_PREFIX)


def _header(scope: dict, name: str) -> str | None:
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers", ()):
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


async def _refuse(send: Any, message: str) -> None:
    # MLflow's own error shape, so a client reads it like any other gateway error.
    body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


app = ConversationScope(mlflow_app)

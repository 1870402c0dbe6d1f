"""How an app names the conversation a request belongs to: one HTTP header, which the gateway's traces carry
as their session (oel.traces.SESSION), so the requests of one conversation are one session."""

from __future__ import annotations

import re

HEADER = "X-Conversation-Id"
MAX_LENGTH = 250  # MLflow 3.17's trace-analytics column for a session id holds 250 characters
# What a UUID, a chat id or a user@thread key needs; no quote or space, so an id can stand in a trace search filter.
ALLOWED = re.compile(r"^[A-Za-z0-9._:@/+=~-]+$")


def check(value: str) -> str | None:
    """Why a header value cannot be a session id, or None when it can."""
    if not value:
        return f"{HEADER} is empty; send the conversation's id, or leave the header out"
    if len(value) > MAX_LENGTH:
        return f"{HEADER} is {len(value)} characters long; MLflow keeps session ids of at most {MAX_LENGTH}"
    if not ALLOWED.match(value):
        return f"{HEADER} {value[:40]!r}: use letters, digits and . _ : @ / + = ~ - (e.g. a UUID)"
    return None

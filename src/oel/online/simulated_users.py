"""Simulated users as an app's traffic: the users game's personas (oel.games.users) speaking to the gateway through
the official `openai` client, one conversation id per user, as any app pointed at `oel serve` would.

Each seed is one user with a name, an everyday question and one hidden preference (oel.games.checkers judges a
reply). A user opens with their question; a reply that misses the preference earns their complaint as the next
message (the implicit signal the trace keeps), up to `max_turns` replies. When the conversation ends the user
rates it: the explicit `user_feedback` assessment (true when a reply met the preference), with their last words as
the rationale ("Could you say that in French?" or "Thanks, that is just what I wanted."), never the checker's
verdict line, which names the hidden preference.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from oel.config import UsersParams
from oel.games.users import HEADER as SYSTEM_PROMPT
from oel.games.users import USER_PREFIX, UsersSession
from oel.online.conversation import HEADER as CONVERSATION_HEADER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What the users' app asks the gateway for on every call (the OpenAI chat-completions fields)."""
    max_tokens: int = 40
    temperature: float = 0.7
    top_p: float = 0.8


@dataclass
class Talk:
    """One user's conversation, as the user lived it."""
    user: str
    name: str
    preference: str
    conversation: str                                       # the X-Conversation-Id sent with every request
    replies: list[str] = field(default_factory=list)
    served_by: list[str] = field(default_factory=list)      # the version that answered each request
    success: bool = False
    passed_at: int | None = None                            # which reply met the preference (1-based)
    last_words: str = ""                                    # the rating's rationale
    error: str | None = None                                # a request that failed: the user left
    seconds: float = 0.0

    def dump(self) -> dict[str, Any]:
        return asdict(self)


def talk(client: Any, model: str, seed: int, users: UsersParams, conversation: str, request: Request) -> Talk:
    """One user's whole conversation with the gateway (a failed request ends it, recorded in `error`)."""
    session = UsersSession(users)
    opening = session.reset(seed).removeprefix(USER_PREFIX)
    who = session.user or {}
    out = Talk(user=who["id"], name=who["name"], preference=who["preference"], conversation=conversation)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": opening}]
    start = time.monotonic()
    while True:
        try:
            answer = client.chat.completions.create(
                model=model, messages=messages, max_tokens=request.max_tokens, temperature=request.temperature,
                top_p=request.top_p, extra_headers={CONVERSATION_HEADER: conversation})
        except Exception as err:  # the openai client's errors: the user gives up, the phase goes on
            out.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            break
        text = answer.choices[0].message.content or ""
        out.replies.append(text)
        out.served_by.append(answer.model)
        messages.append({"role": "assistant", "content": text})
        result = session.step(text)
        words = result.observation.removeprefix(USER_PREFIX)
        if result.done:
            out.success, out.last_words = result.success, words
            out.passed_at = len(out.replies) if result.success else None
            break
        messages.append({"role": "user", "content": words})  # the complaint: the implicit signal
    out.seconds = round(time.monotonic() - start, 3)
    return out


def talk_all(client: Any, model: str, seeds: Sequence[int], users: UsersParams, conversation_of: Callable[[int], str],
             request: Request, concurrency: int) -> list[Talk]:
    """Every user's conversation, `concurrency` at a time, in seed order."""
    done: list[Talk] = []

    def one(seed: int) -> Talk:
        result = talk(client, model, seed, users, conversation_of(seed), request)
        done.append(result)
        if len(done) % 8 == 0 or len(done) == len(seeds):
            log.info("users %d/%d success=%d", len(done), len(seeds), sum(t.success for t in done))
        return result

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, seeds))

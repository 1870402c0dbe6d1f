"""A deterministic backend for tests: each response is a pure function of its prompt."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from oel.config import SamplingParams
from oel.rollout.backend import Generation
from oel.schemas import Message

Script = Callable[[list[Message]], str]
MOVES = ("up", "down", "left", "right")


def hashed_move(prompt: list[Message]) -> str:
    """Default script: a move chosen by a hash of the whole prompt, in the paper's answer format."""
    digest = hashlib.sha256("\x1e".join(m.content for m in prompt).encode("utf-8")).digest()
    return f"I think the best move is [{MOVES[digest[0] % len(MOVES)]}]"


class FakeBackend:
    """Ignores sampling and seed on purpose: batching can then never change a response, which is what
    the batching tests need. `calls` records every batch for inspection."""

    def __init__(self, script: Script = hashed_move):
        self.script = script
        self.calls: list[list[list[Message]]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts: list[list[Message]], sampling: SamplingParams,
                 seed: int | None = None) -> list[Generation]:
        self.calls.append(list(prompts))
        texts = [self.script(p) for p in prompts]
        return [Generation(t, self.count_tokens(t) + 1) for t in texts]  # +1: the EOS

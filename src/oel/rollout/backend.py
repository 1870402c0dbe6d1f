"""Generation backends: one interface, transformers now, vLLM for GPU users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from oel.config import SamplingParams
from oel.schemas import Message


@dataclass(frozen=True)
class Generation:
    text: str               # decoded response (special tokens removed; <think> kept for thinking models)
    n_tokens: int           # generated tokens, up to and including EOS


class Backend(Protocol):
    def generate(self, prompts: list[list[Message]], sampling: SamplingParams,
                 seed: int | None = None) -> list[Generation]:
        """One batched call: one Generation per prompt, in order."""
        ...

    def count_tokens(self, text: str) -> int:
        ...

"""Generation backends: one interface, transformers now, vLLM for GPU users.

Shared helpers live here so both real backends template and guard prompts the same way.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

from oel.config import SamplingParams
from oel.generation import BackendError  # noqa: F401  (re-exported: one error type)
from oel.schemas import Message

log = logging.getLogger(__name__)


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


def derive_seed(base: int, *parts: object) -> int:
    """A stable 31-bit seed from a base seed and labels (crc32: identical across processes/platforms)."""
    key = ":".join(str(p) for p in (base, *parts))
    return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF


def special_strings(tokenizer: Any) -> frozenset[str]:
    """Every special / added-special token string of a tokenizer (what must never appear in content)."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(added, "special", False):
            out.add(added.content)
    return frozenset(t for t in out if t)


def chat_text(tokenizer: Any, messages: list[Message], thinking: bool, specials: frozenset[str]) -> str:
    """Chat-template one prompt. render_play already sanitised the content; this is the last guard for
    tokenizers whose special strings fit no shape `sanitize` knows."""
    from oel.prompts import sanitize

    dicts = []
    for msg in messages:
        content = msg.content
        if any(tok in content for tok in specials):
            log.warning("prompt content held a special token of this tokenizer; neutralised it")
            content = sanitize(content, max_chars=2 * len(content) + 16, extra_tokens=specials)
        dicts.append({"role": msg.role, "content": content})
    # A trailing assistant message is a response prefix the model continues (e.g. a format marker that
    # small models otherwise ignore). enable_thinking is read by thinking-model templates (Qwen3) only.
    prefix = bool(dicts) and dicts[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=not prefix,
                                         continue_final_message=prefix, enable_thinking=thinking)


class ChatTokenizing:
    """What both real backends share: chat templating and token ids through one guarded path."""

    tokenizer: Any
    thinking: bool
    _specials: frozenset[str]

    def prompt_text(self, messages: list[Message]) -> str:
        return chat_text(self.tokenizer, messages, self.thinking, self._specials)

    def prompt_ids(self, prompts: list[list[Message]]) -> list[list[int]]:
        """Token ids of each templated prompt (the template already holds any BOS, so none is added)."""
        return self.tokenizer([self.prompt_text(p) for p in prompts], add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

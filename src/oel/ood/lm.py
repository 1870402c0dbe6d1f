"""The two model calls the OOD probe needs: batched greedy chat answers and plain-text log-likelihood."""

from __future__ import annotations

import re

THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Instructions are checked on the visible answer; a thinking model's reasoning is not part of it."""
    return THINK.sub("", text).strip()


def greedy_answers(backend, questions: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """One greedy chat answer per question through the play backend (same template and thinking switch);
    greedy so the probe is deterministic and comparable across rounds."""
    from oel.config import SamplingParams
    from oel.schemas import Message

    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [[Message(role="user", content=q)] for q in questions[start:start + batch_size]]
        answers += [strip_thinking(g.text) for g in backend.generate(prompts, greedy, seed=0)]
    return answers


def mean_loglik(backend, paragraphs: list[str]) -> float:
    """Token-weighted mean log-likelihood (nats/token) of the paragraphs as plain text, no chat template,
    scored by the generation backend (transformers forward pass, or vLLM prompt logprobs)."""
    total, count = backend.loglik(paragraphs)
    return total / count if count else 0.0

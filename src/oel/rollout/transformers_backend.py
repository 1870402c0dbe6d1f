"""Batched generation with transformers: left padding, KV cache (generate), one call per lockstep turn."""

from __future__ import annotations

import logging
from typing import Any

from oel.config import SamplingParams
from oel.models import LoadedModel
from oel.rollout.backend import Generation, chat_text, special_strings
from oel.schemas import Message

log = logging.getLogger(__name__)


class TransformersBackend:
    """`fixed_length=True` forces every response to exactly max_new_tokens (benchmarks only: it makes
    one-at-a-time and batched runs generate the same token counts)."""

    def __init__(self, loaded: LoadedModel, thinking: bool = False, fixed_length: bool = False):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.thinking = thinking
        self.fixed_length = fixed_length
        self._specials = special_strings(self.tokenizer)
        self._eos = _eos_ids(self.model, self.tokenizer)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos[0]
        self._max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._warned_length = False

    def prompt_text(self, messages: list[Message]) -> str:
        return chat_text(self.tokenizer, messages, self.thinking, self._specials)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[list[Message]], sampling: SamplingParams,
                 seed: int | None = None) -> list[Generation]:
        import torch

        if not prompts:
            return []
        enc = self.encode(prompts)
        width = enc["input_ids"].shape[1]
        self._check_length(width, sampling.max_new_tokens)
        devices = [torch.cuda.current_device()] if self.model.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if seed is not None:  # forked: seeding here never disturbs the caller's RNG stream
                torch.manual_seed(seed)
            out = self.model.generate(**enc, **self.generate_kwargs(sampling))
        return [self._decode(row) for row in out[:, width:].tolist()]

    def encode(self, prompts: list[list[Message]]) -> Any:
        """Chat-templated, left-padded batch. Left padding puts every row's last prompt token in the same
        column, so one decode step serves the whole batch; generate derives position ids from the mask."""
        texts = [self.prompt_text(p) for p in prompts]
        return self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                              add_special_tokens=False).to(self.model.device)

    def generate_kwargs(self, sampling: SamplingParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self._pad,
                              "eos_token_id": self._eos}
        if self.fixed_length:
            kw["min_new_tokens"] = sampling.max_new_tokens
        if sampling.temperature == 0:
            return {**kw, "do_sample": False}  # greedy: sampling knobs are ignored, so none are passed
        return {**kw, "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k}  # top_k 0 = off, for transformers as for us

    def _decode(self, row: list[int]) -> Generation:
        # Tokens after the first EOS are padding; the EOS itself counts (the paper's response mask).
        n = next((i + 1 for i, tok in enumerate(row) if tok in self._eos), len(row))
        return Generation(self.tokenizer.decode(row[:n], skip_special_tokens=True), n)

    def _check_length(self, prompt_tokens: int, max_new: int) -> None:
        if self._max_positions and prompt_tokens + max_new > self._max_positions and not self._warned_length:
            self._warned_length = True
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceeds the model's context (%d); "
                        "output quality will degrade", prompt_tokens, max_new, self._max_positions)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer defines no EOS token; generation could never stop")
    return ids

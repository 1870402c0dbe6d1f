"""Batched generation with transformers: left padding, KV cache (generate), one call per lockstep turn.

Prompt states are reused across episodes and turns (`oel.models.prompt_cache`), so a call prefills only what
its prompts add; results agree with plain left padding up to float noise.
"""

from __future__ import annotations

import logging
from typing import Any

from oel.config import SamplingParams
from oel.models import LoadedModel
from oel.models.prompt_cache import PromptCache, layout, supports_prefix_cache
from oel.rollout.backend import ChatTokenizing, Generation, special_strings
from oel.schemas import Message

log = logging.getLogger(__name__)


class TransformersBackend(ChatTokenizing):
    """`fixed_length=True` forces every response to exactly max_new_tokens (benchmarks only: it makes
    one-at-a-time and batched runs generate the same token counts). `prefix_cache=False` prefills every
    prompt in full (the reference path; the cache also switches itself off for models it cannot serve).
    `cache_bytes` bounds the per-row prompt states kept between calls."""

    def __init__(self, loaded: LoadedModel, thinking: bool = False, fixed_length: bool = False,
                 prefix_cache: bool = True, cache_bytes: int = 2 << 30):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.thinking = thinking
        self.fixed_length = fixed_length
        use_cache = prefix_cache and supports_prefix_cache(self.model)
        self.cache = PromptCache(self.model, cache_bytes) if use_cache else None
        self.prompt_tokens = 0   # prompt tokens of every row of every call
        self.prefill_tokens = 0  # positions run through the model before decoding (padding included)
        self._specials = special_strings(self.tokenizer)
        self._eos = _eos_ids(self.model, self.tokenizer)
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos[0]
        self._max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._warned_length = False

    def generate(self, prompts: list[list[Message]], sampling: SamplingParams,
                 seed: int | None = None) -> list[Generation]:
        import torch

        if not prompts:
            return []
        rows = self.prompt_ids(prompts)
        self._check_length(max(map(len, rows)), sampling.max_new_tokens)
        self.prompt_tokens += sum(map(len, rows))
        devices = [torch.cuda.current_device()] if self.model.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if seed is not None:  # forked: seeding here never disturbs the caller's RNG stream
                torch.manual_seed(seed)
            inputs = self._inputs(rows)
            out = self.model.generate(**inputs, **self.generate_kwargs(sampling), return_dict_in_generate=True)
            if self.cache:
                self._guarded(lambda: self.cache.keep(rows, inputs["attention_mask"], out.cache))
        width = inputs["input_ids"].shape[1]
        return [self._decode(row) for row in out.sequences[:, width:].tolist()]

    def loglik(self, texts: list[str]) -> tuple[float, int]:
        """(sum of log p(token | prefix), scored tokens) over plain texts, no chat template. Each text is
        scored on its own so padding never enters the sum; its first token has no context and is not scored."""
        import torch

        total, count = 0.0, 0
        for text in texts:
            ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.model.device)
            if ids.shape[1] < 2:
                continue
            with torch.inference_mode():
                logits = self.model(input_ids=ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1))
            total += float(logp.sum())
            count += ids.shape[1] - 1
        return total, count

    @property
    def prefix_cache(self) -> bool:
        return self.cache is not None

    def encode(self, prompts: list[list[Message]]) -> dict[str, Any]:
        """Chat-templated, left-padded batch without the prefix cache (the reference inputs)."""
        return self._layout(rows := self.prompt_ids(prompts), [0] * len(rows))

    def generate_kwargs(self, sampling: SamplingParams) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": self._pad,
                              "eos_token_id": self._eos}
        if self.fixed_length:
            kw["min_new_tokens"] = sampling.max_new_tokens
        if sampling.temperature == 0:
            return {**kw, "do_sample": False}  # greedy: sampling knobs are ignored, so none are passed
        return {**kw, "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k}  # top_k 0 = off, for transformers as for us

    # --- inputs -------------------------------------------------------------------------------------

    def _inputs(self, rows: list[list[int]]) -> dict[str, Any]:
        """generate's inputs: with a prefilled `cache` of reused prompt states where the prefix cache has
        any, plain left padding otherwise."""
        plan = self._guarded(lambda: self.cache.plan(rows)) if self.cache else None
        cache = self._guarded(lambda: self.cache.batch_cache(plan)) if plan else None
        if cache is None:
            inputs = self._layout(rows, [0] * len(rows))
        else:
            inputs = {**self._layout(rows, plan.reuse), "cache": cache}
        reused = cache.get_seq_length() if cache is not None else 0
        self.prefill_tokens += inputs["input_ids"][:, reused:].numel()  # generate prefills the rest
        return inputs

    def _layout(self, rows: list[list[int]], reuse: list[int]) -> dict[str, Any]:
        """Per row [padding][reused tokens][padding][new tokens] (prompt_cache.layout), on the model's device."""
        ids, mask = layout(rows, reuse, self._pad)
        return {"input_ids": ids.to(self.model.device), "attention_mask": mask.to(self.model.device)}

    def _guarded(self, step: Any) -> Any:
        """Run a prefix-cache step; an architecture it misjudged turns the cache off (None) instead of failing."""
        before = self.cache.computed
        try:
            result = step()
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
            log.warning("prefix cache disabled for this model (%s: %s); prefilling prompts in full",
                        type(err).__name__, err)
            self.cache = None
            return None
        self.prefill_tokens += self.cache.computed - before
        return result

    # --- outputs ------------------------------------------------------------------------------------

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

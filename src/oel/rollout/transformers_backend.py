"""Batched generation with transformers: left padding, KV cache (generate), one call per lockstep turn.

Prefix caching: a lockstep batch shares a long prompt prefix (chat template + game header: 170 of 277
tokens for FrozenLake), and an episode's next prompt extends its previous one up to the new observation.
Prefill is compute-bound on a CPU, so the backend keeps the KV states of the last prefix it computed
(batch 1), computes only what a new call adds, and broadcasts it over the batch. Rows then read
[shared prefix][padding][own suffix]; position ids come from the attention mask, so every row sees the
same positions as in a plain left-padded call and results agree up to float noise. The cache assumes the
weights stay fixed under it: build a new backend for a changed model.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

from oel.config import SamplingParams
from oel.models import LoadedModel
from oel.rollout.backend import Generation, chat_text, special_strings
from oel.schemas import Message

log = logging.getLogger(__name__)

MIN_PREFIX = 32  # shorter shared prefixes are not worth a second forward pass


@dataclass
class _Prefix:
    ids: list[int]
    kv: list[tuple[Any, Any]]  # per layer (keys, values), shape [1, kv_heads, len(ids), head_dim]


class TransformersBackend:
    """`fixed_length=True` forces every response to exactly max_new_tokens (benchmarks only: it makes
    one-at-a-time and batched runs generate the same token counts). `prefix_cache=False` prefills every
    prompt in full (the reference path; the cache also switches itself off for models it cannot serve)."""

    def __init__(self, loaded: LoadedModel, thinking: bool = False, fixed_length: bool = False,
                 prefix_cache: bool = True):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.thinking = thinking
        self.fixed_length = fixed_length
        self.prefix_cache = prefix_cache and _supports_prefix_cache(self.model)
        self.prompt_tokens = 0   # prompt tokens of every row of every call
        self.prefill_tokens = 0  # token positions actually run through the model before decoding (padding too)
        self._prefix: _Prefix | None = None
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
        rows = self._token_rows(prompts)
        self._check_length(max(map(len, rows)), sampling.max_new_tokens)
        self.prompt_tokens += sum(map(len, rows))
        devices = [torch.cuda.current_device()] if self.model.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if seed is not None:  # forked: seeding here never disturbs the caller's RNG stream
                torch.manual_seed(seed)
            inputs = self._with_prefix(rows) if self.prefix_cache else None
            if inputs is None:
                inputs = self._layout(rows, shared=0)
                self.prefill_tokens += inputs["input_ids"].numel()
            out = self.model.generate(**inputs, **self.generate_kwargs(sampling))
        width = inputs["input_ids"].shape[1]
        return [self._decode(row) for row in out[:, width:].tolist()]

    def encode(self, prompts: list[list[Message]]) -> dict[str, Any]:
        """Chat-templated, left-padded batch without the prefix cache (the reference inputs)."""
        return self._layout(self._token_rows(prompts), shared=0)

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

    def _token_rows(self, prompts: list[list[Message]]) -> list[list[int]]:
        texts = [self.prompt_text(p) for p in prompts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _layout(self, rows: list[list[int]], shared: int) -> dict[str, Any]:
        """[shared prefix][padding][own suffix] per row; shared=0 is plain left padding. Left padding puts
        every row's last prompt token in the same column, so one decode step serves the whole batch;
        generate derives position ids from the mask, so padding shifts no row's positions."""
        import torch

        width = shared + max(len(r) - shared for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :shared] = torch.tensor(row[:shared])
            mask[i, :shared] = 1
            own = row[shared:]
            ids[i, width - len(own):] = torch.tensor(own)
            mask[i, width - len(own):] = 1
        return {"input_ids": ids.to(self.model.device), "attention_mask": mask.to(self.model.device)}

    def _with_prefix(self, rows: list[list[int]]) -> dict[str, Any] | None:
        """Inputs plus a prefilled cache for the rows' shared prefix; None when too short to pay off."""
        from transformers import DynamicCache

        shared = _common_prefix(rows, limit=min(map(len, rows)) - 1)  # each row feeds >= 1 token itself
        if shared < MIN_PREFIX:
            return None
        try:
            kv = self._prefix_kv(rows[0][:shared])
        except (TypeError, ValueError, RuntimeError, AttributeError) as err:  # an architecture we misjudged
            log.warning("prefix cache disabled for this model (%s: %s); prefilling prompts in full",
                        type(err).__name__, err)
            self.prefix_cache, self._prefix = False, None
            return None
        inputs = self._layout(rows, shared)
        self.prefill_tokens += inputs["input_ids"][:, shared:].numel()
        n = len(rows)  # expand is a view; the cache's first update copies it, so the stored prefix stays intact
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv],
                             config=self.model.config)
        return {**inputs, "cache": cache}

    def _prefix_kv(self, prefix: list[int]) -> list[tuple[Any, Any]]:
        """KV states of `prefix`, reusing the longest part the last call already computed."""
        import torch
        from transformers import DynamicCache

        old = self._prefix
        reuse = _common_prefix([old.ids, prefix]) if old else 0
        kv = [(k[..., :reuse, :], v[..., :reuse, :]) for k, v in old.kv] if old and reuse else []
        if reuse < len(prefix):
            cache = DynamicCache(ddp_cache_data=kv or None, config=self.model.config)
            new = torch.tensor([prefix[reuse:]], dtype=torch.long, device=self.model.device)
            out = self.model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1)
            self.prefill_tokens += new.numel()
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._prefix = _Prefix(list(prefix), kv)
        return kv

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


def _common_prefix(rows: list[list[int]], limit: int | None = None) -> int:
    n = min(map(len, rows)) if limit is None else limit
    first = rows[0]
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return max(n, 0)


def _supports_prefix_cache(model: Any) -> bool:
    """Decoder-only, full attention in every layer, position ids taken from the mask: then a cached prefix
    followed by padding is exactly equivalent to left padding. Anything else prefills in full."""
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return False
    elif getattr(cfg, "sliding_window", None):
        return False
    return "position_ids" in inspect.signature(model.forward).parameters


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

"""Prompt prefixes the distill step runs once instead of once per row (no trainer here; oel.models.prompt_cache
does the bookkeeping).

- The teacher's store prefixes, across the run. Every teacher prompt of one knowledge store starts with the same
  tokens: the chat template, the store's knowledge block and the game's rules (261-304 of 368-583 tokens on the
  make-run rows). The teacher's weights never change during distillation (LoRA: the base with the adapter
  disabled; full fine-tuning: a frozen copy), so those states are the same at every step: computed once, at
  batch 1, and each teacher forward runs only what follows them (the rest of the prompt and the completion).
- The sampler's shared prefix, within one call. The student's prompts of one step share the chat template and
  the game's header (170 of 277-449 tokens); the student changes every step, so the prefix is computed at batch
  1 for that call only and broadcast, as the rollout engine does in play.

Rows of a batch that share more (the same turn drawn twice) share that too, for that call. Per row the model
reads [padding][reused states][padding][own tokens], position ids from the attention mask, so every row sees the
positions of a plain left-padded batch and logits agree up to float noise (tests/integration/test_distill_prefix.py).
Single process only: under DDP/FSDP an extra batch-1 forward on one rank would desynchronise the collectives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from oel.models.prompt_cache import MIN_REUSE, PromptCache, common_prefix, layout, supports_prefix_cache


def usable(model: Any, processes: int) -> bool:
    """One process and an architecture the prefix cache serves exactly (a PEFT model is judged by its base
    model: its own forward passes position ids through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return processes == 1 and supports_prefix_cache(base)


def store_prefixes(teacher_ids: list[list[int]], stores: list[str]) -> list[list[int]]:
    """Per store, the token prefix every teacher prompt of that store shares (those of >= MIN_REUSE tokens)."""
    by_store: dict[str, list[list[int]]] = {}
    for ids, store in zip(teacher_ids, stores, strict=True):
        by_store.setdefault(store, []).append(ids)
    out = []
    for rows in by_store.values():
        n = common_prefix(rows, limit=min(map(len, rows)) - 1)  # each row keeps >= 1 token of its own
        if n >= MIN_REUSE:
            out.append(rows[0][:n])
    return out


def sampling_inputs(model: Any, rows: list[list[int]], pad_id: int) -> tuple[dict[str, Any], int]:
    """generate's inputs for these prompts with their shared prefix prefilled once (a `cache` of its states),
    or plain left padding where nothing is worth reusing; and how many prompt tokens came from states."""
    cache = PromptCache(model, max_bytes=0)  # this call's weights only: nothing is kept after it
    plan = cache.plan(rows)
    reuse = plan.reuse if plan else [0] * len(rows)
    ids, mask = layout(rows, reuse, pad_id)
    inputs = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
    if plan:
        inputs["cache"] = cache.batch_cache(plan)
    return inputs, sum(reuse)


class TeacherPrefixCache:
    """Teacher logits at the completion positions, prefilling each store's shared prefix once per run."""

    def __init__(self, model: Any, prefixes: list[list[int]], pad_id: int):
        self.cache = PromptCache(model, max_bytes=0)
        self.prefixes, self.pad_id = prefixes, pad_id
        self.warm = False
        self.reused = 0  # prompt tokens read from states instead of recomputed, over the run
        self.own = 0     # prompt tokens run after the reused states, over the run

    @classmethod
    def for_prompts(cls, model: Any, prompts: list[Any], stores: list[str], tokenize: Callable[[list[Any]], list[list[int]]],
                    pad_id: int) -> TeacherPrefixCache:
        """The cache of a run's teacher prompts (chat messages, one per scheduled row) and their stores."""
        unique: dict[str, tuple[Any, str]] = {}  # rows repeat in the schedule: tokenize each prompt once
        for messages, store in zip(prompts, stores, strict=True):
            unique.setdefault(repr(messages), (messages, store))
        ids = tokenize([messages for messages, _ in unique.values()])
        return cls(model, store_prefixes(ids, [store for _, store in unique.values()]), pad_id)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
        """The teacher's raw logits for the last `width` columns (the completion), as a plain left-padded
        forward of [teacher prompt, completion] gives them: [rows, width, vocab]. Call it in the teacher's
        context (no_grad, adapter disabled) and the autocast the training forward runs in."""
        if not self.warm:  # lazily, inside that context, so the states are the teacher's in the same precision
            for ids in self.prefixes:
                self.cache.add(ids)
            self.warm = True
        prompt = input_ids.shape[1] - width
        rows = [ids[m.bool()].tolist()
                for ids, m in zip(input_ids[:, :prompt], attention_mask[:, :prompt], strict=True)]
        kept = list(self.cache.entries)
        try:  # batch-wide prefixes planned for this call are dropped after it: only the stores' stay
            plan = self.cache.plan(rows)
            past = self.cache.batch_cache(plan) if plan else None
        finally:
            self.cache.entries = kept
        reuse = plan.reuse if plan else [0] * len(rows)
        self.reused += sum(reuse)
        self.own += sum(len(r) for r in rows) - sum(reuse)
        ids, mask = layout(rows, reuse, self.pad_id)
        left = max(reuse)  # the reused columns are read from `past`; the rest and the completion are run
        device = input_ids.device
        ids = torch.cat([ids[:, left:].to(device), input_ids[:, prompt:]], dim=1)
        mask = torch.cat([mask.to(device), attention_mask[:, prompt:].long()], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, left:]
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_to_keep": width + 1,
                  **({"cache": past, "use_cache": True} if past is not None else {"use_cache": False})}
        logits = self.cache.model(**inputs).logits
        return logits[:, :-1, :][:, -width:, :]

"""The frozen teacher's states of each store's shared prompt prefix, computed once per run (no trainer here).

Every teacher prompt of one knowledge store starts with the same tokens: the chat template, the store's
knowledge block and the game's rules (261-304 of 368-583 tokens on the make-run rows). The teacher's weights
never change during distillation (LoRA: the base with the adapter disabled; full fine-tuning: a frozen copy),
so the states of those prefixes are the same at every step: they are computed once, at batch 1, and each
teacher forward runs only what follows them (the rest of the prompt and the sampled completion). Rows of one
batch that share more than their store's prefix (the same turn drawn twice) share that too, for that call.

Per row the forward reads [padding][reused states][padding][own prompt tokens][completion], with position ids
from the attention mask, so every row sees the positions of a plain left-padded forward and the logits agree
up to float noise (tests/integration/test_teacher_cache.py). Single process only: under DDP/FSDP an extra
batch-1 forward on one rank would desynchronise the collectives.
"""

from __future__ import annotations

from typing import Any

import torch

from oel.rollout.prompt_cache import MIN_REUSE, PromptCache, common_prefix, supports_prefix_cache


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


class TeacherPrefixCache:
    """Teacher logits at the completion positions, prefilling each store's shared prefix once per run."""

    def __init__(self, model: Any, prefixes: list[list[int]], pad_id: int):
        self.cache = PromptCache(model, max_bytes=0)
        self.prefixes, self.pad_id = prefixes, pad_id
        self.warm = False
        self.reused = 0  # prompt tokens read from states instead of recomputed, over the run
        self.own = 0     # prompt tokens run after the reused states, over the run

    @property
    def computed(self) -> int:
        """Prompt tokens the teacher ran over the run: the prefixes once, then each row's own part."""
        return self.cache.computed + self.own

    @staticmethod
    def usable(model: Any, prefixes: list[list[int]], processes: int) -> bool:
        """Any prefix worth reusing, one process, and an architecture the prefix cache serves exactly (a PEFT
        model is judged by its base model: its own forward passes position ids through)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return bool(prefixes) and processes == 1 and supports_prefix_cache(base)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
        """The teacher's raw logits for the last `width` columns (the completion), as a plain left-padded
        forward of [teacher prompt, completion] gives them: [rows, width, vocab]. Call it in the teacher's
        context (no_grad, adapter disabled) and the autocast the training forward runs in."""
        if not self.warm:  # lazily, inside that context, so the states are the teacher's in the same precision
            for ids in self.prefixes:
                self.cache.add(ids)
            self.warm = True
        prompt = input_ids.shape[1] - width
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids[:, :prompt], attention_mask[:, :prompt], strict=True)]
        kept = list(self.cache.entries)
        try:  # batch-wide prefixes planned for this call are dropped after it: only the stores' stay
            plan = self.cache.plan(rows)
            past = self.cache.batch_cache(plan) if plan else None
        finally:
            self.cache.entries = kept
        reuse = plan.reuse if plan else [0] * len(rows)
        ids, mask, past_width = self._layout(rows, reuse, input_ids[:, prompt:], attention_mask[:, prompt:])
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past_width:]
        self.reused += sum(reuse)
        self.own += sum(len(r) for r in rows) - sum(reuse)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "logits_to_keep": width + 1}
        if past is not None:
            inputs.update(cache=past, use_cache=True)
        else:
            inputs["use_cache"] = False
        logits = self.cache.model(**inputs).logits
        return logits[:, :-1, :][:, -width:, :]

    def _layout(self, rows: list[list[int]], reuse: list[int], completion: torch.Tensor,
                completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input ids of the forward, the attention mask over reused states + those ids, the reused width).
        Per row: [padding][reused][padding][own prompt tokens][completion]; the completions stay column-aligned."""
        left = max(reuse)
        own = max(len(row) - n for row, n in zip(rows, reuse, strict=True))
        device = completion.device
        ids = torch.full((len(rows), own), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), left + own), dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, reuse, strict=True)):
            tail = row[n:]
            ids[i, own - len(tail):] = torch.tensor(tail, dtype=torch.long)
            mask[i, left - n:left] = 1
            mask[i, left + own - len(tail):] = 1
        ids = torch.cat([ids.to(device), completion], dim=1)
        mask = torch.cat([mask.to(device), completion_mask.to(device=device, dtype=torch.long)], dim=1)
        return ids, mask, left

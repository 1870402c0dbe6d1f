"""KV states of recent prompts, reused by token prefix (the transformers backend's prefix cache).

Prefill is compute-bound on a CPU and costs the same per token batched or not, so lockstep play would
re-read every prompt in full at every turn. Two kinds of reuse make each call prefill only what it adds:
- across episodes: rows of one game share the chat template and game header (170 of 277 FrozenLake
  tokens), computed once per group of rows at batch 1 and broadcast (a batch may mix games);
- across turns: an episode's next prompt extends its previous one up to the new observation, so each
  row's own prompt states are kept after the call (within a memory budget) and matched next time.

A batch then reads, per row, [padding][reused states][padding][new tokens]; generate takes position ids
from the attention mask, so each row sees exactly the positions of a plain left-padded call and results
agree up to float noise. Entries assume fixed weights: build a new cache for a changed model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_REUSE = 32  # fewer reusable tokens are not worth a second forward pass or the bookkeeping


@dataclass
class Entry:
    ids: list[int]
    kv: list[tuple[Any, Any]]  # per layer (keys, values), shape [1, kv_heads, len(ids), head_dim]
    array: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.ids, dtype=np.int64)


@dataclass
class Plan:
    """What one call reuses: per row, how many leading tokens come from which entry."""
    reuse: list[int]
    sources: list[Entry | None]


class PromptCache:
    """Prompt states of the last call's rows (plus any batch-wide prefix computed for it), matched to a new
    call's rows by longest common token prefix."""

    def __init__(self, model: Any, max_bytes: int):
        self.model = model
        self.max_bytes = max_bytes
        self.entries: list[Entry] = []
        self.shared: Entry | None = None  # the last batch-wide prefix computed
        self.computed = 0  # prefix tokens run through the model by this cache

    def plan(self, rows: list[list[int]]) -> Plan | None:
        """Reuse per row (each row keeps >= 1 token to feed itself); None when nothing is worth reusing."""
        arrays = [np.asarray(r, dtype=np.int64) for r in rows]
        best = [self._best(row, len(row) - 1) for row in arrays]
        for group in _groups(arrays):  # rows of one game share its header even when the batch mixes games
            members = [arrays[i] for i in group]
            shared = common_prefix(members, limit=min(map(len, members)) - 1)
            if shared >= MIN_REUSE and any(best[i][0] < shared for i in group):
                self.shared = entry = self._extend(rows[group[0]][:shared])  # once at batch 1, then broadcast
                self.entries.append(entry)
                for i in group:
                    best[i] = max(best[i], (shared, entry), key=lambda b: b[0])
        best = [(n, e) if n >= MIN_REUSE else (0, None) for n, e in best]
        if not any(n for n, _ in best):
            return None
        return Plan([n for n, _ in best], [e for _, e in best])

    def batch_cache(self, plan: Plan) -> Any:
        """A DynamicCache of width max(reuse): each row's reused states right-aligned, zeros (masked) before."""
        from transformers import DynamicCache

        width = max(plan.reuse)
        template = next(e for e in plan.sources if e is not None).kv
        layers = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros((len(plan.reuse), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(plan.reuse), v0.shape[1], width, v0.shape[3]))
            for i, (n, src) in enumerate(zip(plan.reuse, plan.sources, strict=True)):
                if n:
                    keys[i, :, width - n:] = src.kv[layer][0][0, :, :n]
                    values[i, :, width - n:] = src.kv[layer][1][0, :, :n]
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def keep(self, rows: list[list[int]], mask: Any, cache: Any) -> None:
        """After a call: keep each row's prompt states (the unmasked prompt columns) for its next turn.
        Over the memory budget only the shared-prefix entries stay (reuse across episodes still works)."""
        k0 = cache.layers[0].keys
        per_token = 2 * len(cache.layers) * k0.shape[1] * k0.shape[3] * k0.element_size()
        if sum(map(len, rows)) * per_token > self.max_bytes:
            self.entries = [self.shared] if self.shared else []
            return
        entries = []
        for i, row in enumerate(rows):
            cols = mask[i].nonzero().squeeze(-1)
            if len(cols) != len(row):
                raise RuntimeError(f"row {i}: the attention mask holds {len(cols)} prompt columns, not {len(row)}")
            kv = [(layer.keys[i:i + 1, :, cols], layer.values[i:i + 1, :, cols]) for layer in cache.layers]
            entries.append(Entry(list(row), kv))
        self.entries = entries

    def add(self, ids: list[int]) -> Entry:
        """Compute (at batch 1, reusing what an entry already holds) and keep the states of `ids`."""
        entry = self._extend(ids)
        self.entries.append(entry)
        return entry

    def _best(self, row: np.ndarray, limit: int) -> tuple[int, Entry | None]:
        """The entry sharing the longest prefix with `row` (at most `limit` tokens)."""
        best: tuple[int, Entry | None] = (0, None)
        for entry in self.entries:
            n = _lcp(entry.array, row, limit)
            if n > best[0]:
                best = (n, entry)
        return best

    def _extend(self, ids: list[int]) -> Entry:
        """States of `ids` at batch 1, computing only what no entry already holds."""
        import torch
        from transformers import DynamicCache

        n, base = self._best(np.asarray(ids, dtype=np.int64), len(ids))
        kv = [(k[..., :n, :], v[..., :n, :]) for k, v in base.kv] if base and n else []
        if n < len(ids):
            cache = DynamicCache(ddp_cache_data=kv or None, config=self.model.config)
            new = torch.tensor([ids[n:]], dtype=torch.long, device=self.model.device)
            out = self.model(input_ids=new, cache=cache, use_cache=True, logits_to_keep=1)
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
            self.computed += new.numel()
        return Entry(list(ids), kv)


def layout(rows: list[list[int]], reuse: list[int], pad_id: int) -> tuple[Any, Any]:
    """(input ids, attention mask) of a batch whose rows reuse `reuse[i]` leading tokens from a batch cache:
    per row [padding][reused tokens][padding][own tokens], reused parts right-aligned at column max(reuse) (all
    zero: plain left padding). Right alignment puts every row's last token in the same column, so one decode
    step serves the whole batch; position ids follow the mask (generate derives them so), so padding shifts no
    row's positions."""
    import torch

    left = max(reuse)
    width = left + max(len(row) - n for row, n in zip(rows, reuse, strict=True))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, reuse, strict=True)):
        ids[i, left - n:left] = torch.tensor(row[:n], dtype=torch.long)
        mask[i, left - n:left] = 1
        own = row[n:]
        ids[i, width - len(own):] = torch.tensor(own, dtype=torch.long)
        mask[i, width - len(own):] = 1
    return ids, mask


def common_prefix(rows: list[list[int]] | list[np.ndarray], limit: int | None = None) -> int:
    """Length of the token prefix every row shares (at most `limit`)."""
    arrays = [np.asarray(r, dtype=np.int64) for r in rows]
    n = min(map(len, arrays)) if limit is None else max(limit, 0)
    for row in arrays[1:]:
        n = _lcp(arrays[0], row, n)
    return n


def _groups(arrays: list[np.ndarray]) -> list[list[int]]:
    """Row indices grouped greedily by a shared prefix of at least MIN_REUSE tokens with the group's first."""
    todo, groups = list(range(len(arrays))), []
    while todo:
        head = arrays[todo[0]]
        group = {i for i in todo if _lcp(head, arrays[i], MIN_REUSE) == MIN_REUSE} or {todo[0]}
        groups.append(sorted(group))
        todo = [i for i in todo if i not in group]
    return groups


def _lcp(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    n = max(min(len(a), len(b), limit), 0)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def supports_prefix_cache(model: Any) -> bool:
    """Decoder-only, full attention in every layer, position ids taken from the mask: then reused states
    next to padding are exactly equivalent to left padding. Anything else prefills in full."""
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

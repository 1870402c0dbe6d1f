"""Distill rows -> the seeded training schedule and token tensors (no model, no trainer).

A row holds two chat prompts built by consolidate: `prompt` (what the student saw in play, no knowledge) and
`teacher_prompt` (the same render with the knowledge block). Both are templated here the same way
(HF chat template, add_generation_prompt=True); only the student's may be cut to a length limit.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from oel.artifacts import read_jsonl
from oel.errors import UserError
from oel.schemas import DistillRow


def load_rows(path: Path) -> list[DistillRow]:
    """The round's distillation rows; one clear error when the file is missing or empty."""
    if not Path(path).is_file():
        raise UserError(f"{path}: missing; run `oel consolidate --round <round>` first (it writes distill.jsonl)")
    rows = read_jsonl(path, DistillRow)
    if not rows:
        raise UserError(f"{path}: has no rows; rerun consolidate with more collect episodes (consolidate.max_rows)")
    return rows


def schedule(n_rows: int, n_samples: int, seed: int) -> list[int]:
    """Row indices for the whole run: seeded permutations of all rows, cycled until n_samples are drawn.

    Fixing the full order up front (instead of a sampler that reshuffles per epoch) makes a resumed run
    see exactly the rows an uninterrupted run would see at the same step.
    """
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_samples:
        perm = list(range(n_rows))
        rng.shuffle(perm)
        order.extend(perm)
    return order[:n_samples]


def to_records(rows: list[DistillRow], order: list[int]) -> list[dict[str, Any]]:
    """One training example per scheduled row, in the column names SDFTTrainer reads.

    `privileged_context` carries the row's full teacher prompt (messages), not a snippet to splice: our
    trainer templates it as-is instead of using SDFT's `{prompt}\\n\\n{privileged_context}` template.
    `store` names the knowledge store that prompt holds, as game/index (rows of one store share its prefix).
    """
    def msgs(messages) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in messages]

    return [{"row_id": rows[i].row_id, "store": f"{rows[i].game}/{rows[i].store}", "prompt": msgs(rows[i].prompt),
             "privileged_context": msgs(rows[i].teacher_prompt)} for i in order]


def chat_ids(tokenizer, messages: list[dict[str, str]], thinking: bool = False,
             max_tokens: int | None = None) -> list[int]:
    """Template one prompt for generation; `max_tokens` keeps the newest tokens (student only)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        enable_thinking=thinking)["input_ids"]
    ids = list(ids)
    return ids[-max_tokens:] if max_tokens else ids


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every row's last prompt token sits at the same column (completions follow it)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)

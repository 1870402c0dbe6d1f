"""Token-budgeted micro-batches of one prepared distill batch (pure torch: no model, no trainer).

A step's batch (batch_size rows: prompt, sampled completion, teacher prompt) is split into groups of rows whose
padded size (rows x the group's longest sequence, student or teacher) stays within a token budget; each group
runs its own forward and backward and its loss is weighted by its share of the batch's response tokens, so the
gradient is the one of the whole batch's token mean (tests/integration/test_distill_microbatch.py). Why: the
student forward keeps every layer's activations for backward, so memory grows with rows x tokens; grouping
rows of similar length also drops most of the padding that one left-padded batch computes.
"""

from __future__ import annotations

import torch

# Prepared-batch keys, by how a row subset is trimmed of the padding it no longer needs.
_PROMPT = ("prompt_ids", "prompt_mask")                      # left-padded
_COMPLETION = ("completion_ids", "completion_mask", "old_per_token_logps")  # right-padded
_TEACHER = ("teacher_input_ids", "teacher_attention_mask")   # left-padded teacher prompt + the completion


def row_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Per row, the longer of its student and teacher sequences (real tokens, no padding)."""
    completion = batch["completion_mask"].sum(1)
    student = batch["prompt_mask"].sum(1) + completion
    teacher = batch["teacher_attention_mask"].sum(1)
    return torch.maximum(student, teacher).tolist()


def plan(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices in groups, longest rows first; a group holds rows while rows x its longest row <= max_tokens.

    max_tokens 0 = one group of every row in order (SDFT's single forward). A row longer than the budget runs alone.
    """
    if max_tokens <= 0:
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def split_to(groups: list[list[int]], n: int) -> list[list[int]]:
    """Exactly n groups (n <= rows): halve the largest group until there are n. Under DDP/FSDP every process
    must run the same number of forwards (each may sync), so all take the largest count any of them planned."""
    groups = [list(g) for g in groups]
    if n > sum(len(g) for g in groups):
        raise ValueError(f"cannot split {sum(len(g) for g in groups)} rows into {n} micro-batches")
    while len(groups) < n:
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups.pop(k)
        groups[k:k] = [g[:len(g) // 2], g[len(g) // 2:]]
    return groups


def take(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The given rows of a prepared batch, trimmed of the columns that are padding for all of them."""
    idx = torch.tensor(rows, dtype=torch.long, device=batch["completion_ids"].device)
    width = batch["completion_ids"].shape[1]
    teacher_prompt = batch["teacher_input_ids"].shape[1] - width
    completion = int(batch["completion_mask"][idx].sum(1).max().clamp(min=1))
    prompt = int(batch["prompt_mask"][idx].sum(1).max())
    teacher = int(batch["teacher_attention_mask"][idx, :teacher_prompt].sum(1).max())
    out = {}
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value
            continue
        value = value[idx]
        if key in _PROMPT:
            value = value[:, value.shape[1] - prompt:]
        elif key in _COMPLETION:
            value = value[:, :completion]
        elif key in _TEACHER:
            value = torch.cat([value[:, teacher_prompt - teacher:teacher_prompt],
                               value[:, teacher_prompt:teacher_prompt + completion]], dim=1)
        out[key] = value
    return out

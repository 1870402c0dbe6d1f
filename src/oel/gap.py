"""The consolidation gap: the eval of a round on chat logs, where there is no game to win.

On held-out prompts (turn prompts of the conversations import split `heldout`, never extracted from or
distilled), the student samples a reply with no knowledge in context and both models score those same
tokens: the student given the logged prompt, the teacher (the round's START policy) given the same prompt
with a knowledge store in its system message (oel.chatlog.insert_system_knowledge, exactly what the
distillation teacher read). Per prompt, the gap is the mean over the reply's tokens of the exact
full-vocabulary KL(student || teacher) at temperature 1 -- the quantity distillation minimises (its loss is
the top-k, temperature-scaled version of it). At round start the student IS the start policy, so the gap
is what knowledge in context changes; after distillation it is what is left. `reduction` = start - after,
with a paired interval (same prompts, same sampling seed).

Models are anything with `.model` (a transformers causal LM) and `.tokenizer`: a LoadedModel or a
transformers backend. Torch only; no trainer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from oel.chatlog import insert_system_knowledge, is_chat
from oel.config import SamplingParams
from oel.errors import UserError
from oel.knowledge import assign_store
from oel.rollout.backend import chat_text, derive_seed, special_strings
from oel.schemas import Episode, Message

Z95 = 1.959964


@dataclass(frozen=True)
class GapRow:
    row_id: str
    store: int
    prompt: list[Message]          # the logged turn prompt (student)
    teacher_prompt: list[Message]  # the same with the store in the system message


def gap_rows(episodes: Sequence[Episode], stores: Sequence[str], cap: int, seed: int, round_id: str) -> list[GapRow]:
    """Every turn prompt of the held-out chat episodes (a seeded `cap` of them when cap > 0), each paired
    with a store drawn as consolidate draws it for a distillation row."""
    held = [(ep, turn) for ep in episodes if is_chat(ep) and ep.split == "heldout" for turn in ep.turns]
    if not held:
        raise UserError("trajectories.jsonl holds no held-out conversation; set collect.import_heldout_fraction "
                        "> 0 and rerun the round's collect (dvc repro collect@<r>)")
    if not stores:
        raise UserError("no knowledge store of `chat`; run `oel consolidate` for this round first")
    if 0 < cap < len(held):
        picked = sorted(random.Random(derive_seed(seed, round_id, "gap-prompts")).sample(range(len(held)), cap))
        held = [held[i] for i in picked]
    rows = []
    for ep, turn in held:
        rid = f"{ep.episode_id}/t{turn.index}"
        k = assign_store(seed, round_id, rid, len(stores))
        rows.append(GapRow(rid, k, turn.prompt, insert_system_knowledge(turn.prompt, stores[k])))
    return rows


def measure(student: Any, teacher: Any, rows: Sequence[GapRow], sampling: SamplingParams, seed: int,
            batch_size: int = 8, thinking: bool = False) -> dict[str, Any]:
    """Per-row KL and reply length of `student` against `teacher`; summary with 95% intervals."""
    replies = sample(student, [r.prompt for r in rows], sampling, seed, batch_size, thinking)
    kls = [reply_kl(student, teacher, r.prompt, r.teacher_prompt, ids, thinking) for r, ids in zip(rows, replies,
                                                                                                   strict=True)]
    lengths = [float(len(ids)) for ids in replies]
    return {**summary(kls, "kl"), **summary(lengths, "response_tokens"), "prompts": len(rows),
            "tokens": int(sum(lengths)), "per_row": kls, "lengths": lengths}


def summary(values: Sequence[float], name: str) -> dict[str, float]:
    """{name}_mean with a normal-approximation 95% interval over the rows (the row is the unit)."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * sd / math.sqrt(n) if n > 1 else 0.0
    return {f"{name}_mean": mean, f"{name}_ci_low": mean - half, f"{name}_ci_high": mean + half}


def compare(start: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Paired reduction of the gap (start - after, per row) and of the reply length."""
    out = summary([a - b for a, b in zip(start["per_row"], after["per_row"], strict=True)], "reduction")
    diff = summary([b - a for a, b in zip(start["lengths"], after["lengths"], strict=True)], "length_change")
    return {**out, **diff}


# ---- torch -----------------------------------------------------------------------------------------

def _prompt_ids(loaded: Any, messages: list[Message], thinking: bool) -> list[int]:
    text = chat_text(loaded.tokenizer, messages, thinking, special_strings(loaded.tokenizer))
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos(loaded: Any) -> set[int]:
    eos = getattr(loaded.model.generation_config, "eos_token_id", None) or loaded.tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def sample(loaded: Any, prompts: Sequence[list[Message]], sampling: SamplingParams, seed: int, batch_size: int,
           thinking: bool) -> list[list[int]]:
    """The student's reply token ids per prompt (up to and including EOS), batched with left padding."""
    import torch

    model, eos = loaded.model, _eos(loaded)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else min(eos)
    kw: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "pad_token_id": pad, "eos_token_id": sorted(eos)}
    kw |= ({"do_sample": False} if sampling.temperature == 0 else
           {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k})
    out: list[list[int]] = []
    with torch.inference_mode(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            rows = [_prompt_ids(loaded, p, thinking) for p in prompts[start:start + batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
            gen = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:].tolist()
            for row in gen:
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                out.append(row[:cut] or row[:1])
    return out


def _reply_logprobs(loaded: Any, prompt_ids: list[int], reply: list[int]):
    import torch

    ids = torch.tensor([prompt_ids + reply], device=loaded.model.device)
    logits = loaded.model(input_ids=ids).logits[0, len(prompt_ids) - 1:len(prompt_ids) - 1 + len(reply)]
    return torch.log_softmax(logits.float(), dim=-1)


def reply_kl(student: Any, teacher: Any, prompt: list[Message], teacher_prompt: list[Message], reply: list[int],
             thinking: bool = False) -> float:
    """Mean over the reply's tokens of KL(student || teacher), exact over the whole vocabulary."""
    import torch

    with torch.inference_mode():
        s = _reply_logprobs(student, _prompt_ids(student, prompt, thinking), reply)
        t = _reply_logprobs(teacher, _prompt_ids(teacher, teacher_prompt, thinking), reply)
        return float((s.exp() * (s - t)).sum(-1).mean())

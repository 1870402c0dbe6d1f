"""The mechanism on one CPU: distil "Always answer in French." (teacher-only context) into the weights.

The teacher is the untouched model with the instruction appended to the user turn; the student sees the
bare question. After a few on-policy distillation steps the student answers held-out questions in French
without being asked. Two numbers show it, before vs after:

- French answers: greedy student replies (no instruction) judged by `is_french`, a stop-word vote. A
  reply is French when it holds at least two French function words and more French than English ones
  (SmolLM2-135M's French is often broken, but its function words are unmistakable).
- Held-out KL: mean per-token KL(student || teacher) at `kl_temperature`, full vocabulary, on a fixed set
  of completions (the teacher's own greedy replies to the held-out questions, drawn once before training).
  Fixing the completions makes before and after comparable; the on-policy training loss is too noisy.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oel.config import DistillParams, ModelParams, SamplingParams
from oel.distill.dataset import chat_ids, schedule, to_records
from oel.distill.loss import masked_token_mean, response_mask, reverse_kl_full
from oel.schemas import DistillRow, Message

KNOWLEDGE = "Always answer in French."
TRAIN_QUESTIONS = [
    "What is your favourite season and why?", "Describe a good breakfast.", "How do I make a cup of tea?",
    "What should I pack for a beach holiday?", "Tell me about your ideal weekend.", "Why is exercise important?",
    "What is a good way to learn to cook?", "Describe the city you would like to visit.",
    "How can I sleep better at night?", "What makes a good friend?", "Give me advice for a job interview.",
    "What do you like about music?", "How do plants grow?", "What is the best way to save money?",
    "Describe a walk in the forest.", "Why do people like cats?",
]
HELDOUT_QUESTIONS = [
    "What is your favourite food?", "How do I stay healthy?", "Describe your house.",
    "What do you do in the morning?", "Why is reading books useful?", "What is the weather like in summer?",
    "How do I learn a new language?", "Tell me about your family.",
]

FRENCH = {"le", "la", "les", "de", "des", "du", "un", "une", "et", "est", "que", "qui", "pour", "dans", "pas",
          "sur", "au", "aux", "avec", "cette", "ces", "il", "elle", "ils", "je", "vous", "nous", "sont", "ne",
          "par", "mais", "où", "son", "sa", "ses", "leur", "très", "être", "à", "c'", "l'", "d'", "qu'", "j'", "n'",
          "s'", "votre", "mon", "ma", "mes", "est-ce", "bonjour", "oui", "comme", "plus", "aussi"}
ENGLISH = {"the", "and", "is", "of", "to", "that", "it", "for", "you", "are", "with", "this", "be", "was",
           "what", "can", "your", "have", "which", "or", "they", "as", "on", "by", "at", "from", "my", "i", "do"}
_WORD = re.compile(r"[a-zàâäçéèêëîïôöùûüÿœæ]+(?:-[a-z]+)?'?")


def is_french(text: str) -> bool:
    words = _WORD.findall(text.lower().replace("’", "'"))
    fr = sum(w in FRENCH for w in words)
    en = sum(w in ENGLISH for w in words)
    return fr >= 2 and fr > en


def rows(questions: list[str]) -> list[DistillRow]:
    return [DistillRow(row_id=f"demo-{i}", episode_id="demo", game="demo", turn=0, store=0,
                       prompt=[Message(role="user", content=q)],
                       teacher_prompt=[Message(role="user", content=f"{q}\n\n{KNOWLEDGE}")])
            for i, q in enumerate(questions)]


@dataclass
class Snapshot:
    answers: list[str]
    french: int
    kl: float


def _greedy(model, tok, messages: list[dict[str, str]], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([chat_ids(tok, messages)], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _completion_logits(model, tok, messages, completion: list[int]) -> torch.Tensor:
    prompt = chat_ids(tok, messages)
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits[:, len(prompt) - 1:-1, :]  # position t predicts completion token t


def snapshot(model, tok, held: list[DistillRow], references: list[list[int]], temperature: float,
             max_new_tokens: int) -> Snapshot:
    from oel.distill.trainer import teacher_scope

    model.eval()
    answers, kls = [], []
    eos = [tok.eos_token_id]
    for row, ref in zip(held, references, strict=True):
        student_msgs = [m.model_dump() for m in row.prompt]
        teacher_msgs = [m.model_dump() for m in row.teacher_prompt]
        answers.append(tok.decode(_greedy(model, tok, student_msgs, max_new_tokens), skip_special_tokens=True))
        s = _completion_logits(model, tok, student_msgs, ref)
        with teacher_scope(model) as teacher:
            t = _completion_logits(teacher, tok, teacher_msgs, ref)
        mask = response_mask(torch.tensor([ref]), eos)
        kls.append(float(masked_token_mean(reverse_kl_full(s, t, temperature), mask)))
    return Snapshot(answers, sum(is_french(a) for a in answers), sum(kls) / len(kls))


def demo_params(steps: int) -> DistillParams:
    # Defaults of params.yaml (LoRA r16, lr 2e-4, top-k 256, T 0.7) with short replies to keep CPU steps short.
    # No gradient checkpointing: ~50-token rows keep little activation memory, and recomputing them costs time.
    return DistillParams(steps=steps, batch_size=4, save_every=max(steps, 1) * 10, gradient_checkpointing=False,
                         sampling=SamplingParams(temperature=0.7, max_new_tokens=32))


def run_demo(steps: int = 20, model_spec: str = "smollm2-135m-instruct", echo: Callable[[str], Any] = print,
             root: Path = Path("."), eval_tokens: int = 24) -> dict[str, Any]:
    """Train, print before/after, return the numbers (french_before/after out of 8, kl_before/after)."""
    from oel.distill.trainer import distill, samples_needed, teacher_scope
    from oel.models import load_model

    dp = demo_params(steps)
    loaded = load_model(model_spec, ModelParams(name=model_spec), root)
    model, tok = loaded.model, loaded.tokenizer
    held = rows(HELDOUT_QUESTIONS)
    with teacher_scope(model) as teacher:  # the untouched model, knowledge in the prompt
        references = [_greedy(teacher, tok, [m.model_dump() for m in r.teacher_prompt], eval_tokens) for r in held]
    teacher_french = sum(is_french(tok.decode(r, skip_special_tokens=True)) for r in references)
    before = snapshot(model, tok, held, references, dp.kl_temperature, eval_tokens)
    echo(f"teacher (with '{KNOWLEDGE}' in its prompt): {teacher_french}/{len(held)} held-out replies in French")
    echo(f"before: student {before.french}/{len(held)} in French, held-out KL(student||teacher) {before.kl:.4f}")

    train = rows(TRAIN_QUESTIONS)
    records = to_records(train, schedule(len(train), samples_needed(dp, len(train)), dp.seed))
    with tempfile.TemporaryDirectory(prefix="oel-distill-demo-") as ckpt:
        result = distill(model, tok, records, dp, Path(ckpt), {"demo": model_spec, "steps": steps},
                         on_step=lambda step, m: echo(f"step {step:3d}/{steps}  loss {m['loss']:.4f}  "
                                                      f"kl {m['kl']:.4f}  {m['step_seconds']:.1f}s"))
    after = snapshot(result.model, tok, held, references, dp.kl_temperature, eval_tokens)
    echo(f"after:  student {after.french}/{len(held)} in French, held-out KL(student||teacher) {after.kl:.4f} "
         f"({100 * (1 - after.kl / before.kl):.0f}% lower)" if before.kl > 0 else f"after: KL {after.kl:.4f}")
    for q, a0, a1 in zip(HELDOUT_QUESTIONS, before.answers, after.answers, strict=True):
        echo(f"\nQ: {q}\n  before: {a0.strip()[:120]!r}\n  after:  {a1.strip()[:120]!r}")
    return {"steps": steps, "heldout": len(held), "teacher_french": teacher_french,
            "french_before": before.french, "french_after": after.french,
            "kl_before": before.kl, "kl_after": after.kl,
            "seconds_per_step": sum(h["step_seconds"] for h in result.history) / max(len(result.history), 1)}

"""Probe data (shipped prompts and prose), scoring, and the drop check against the base round."""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from oel.errors import UserError
from oel.metrics import wilson_interval
from oel.ood.checkers import CHECKERS

log = logging.getLogger(__name__)
DATA_PACKAGE = "oel"
INSTRUCTIONS = "eval_data/instructions.jsonl"
HELDOUT_TEXT = "eval_data/heldout_text.txt"


@dataclass(frozen=True)
class InstructionPrompt:
    id: str
    prompt: str
    checks: list[dict[str, Any]]              # [{"type": "max_words", "n": 20}, ...]
    example: str = field(default="", compare=False)  # a passing answer: proves the checks are satisfiable

    def results(self, response: str) -> list[bool]:
        return [CHECKERS[c["type"]](response, **_args(c)) for c in self.checks]


def _args(check: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in check.items() if k != "type"}


def _validate(p: InstructionPrompt, where: str) -> None:
    if not p.checks:
        raise UserError(f"{where}: prompt {p.id!r} has no checks")
    for check in p.checks:
        fn = CHECKERS.get(check.get("type", ""))
        if fn is None:
            raise UserError(f"{where}: prompt {p.id!r}: unknown check {check.get('type')!r} "
                            f"(known: {', '.join(sorted(CHECKERS))})")
        try:
            inspect.signature(fn).bind("", **_args(check))
        except TypeError as err:
            raise UserError(f"{where}: prompt {p.id!r}: check {check['type']}: {err}") from None


def _read(name: str) -> str:
    return resources.files(DATA_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def load_instructions(text: str | None = None) -> list[InstructionPrompt]:
    """The shipped instruction prompts (or `text` in the same JSONL format), validated."""
    text = _read(INSTRUCTIONS) if text is None else text
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompt = InstructionPrompt(**json.loads(line))
            _validate(prompt, f"{INSTRUCTIONS}:{lineno}")
            prompts.append(prompt)
    return prompts


def load_heldout_text() -> list[str]:
    """Held-out plain-English paragraphs, separated by blank lines."""
    return [p.strip() for p in _read(HELDOUT_TEXT).split("\n\n") if p.strip()]


def score_responses(prompts: list[InstructionPrompt], responses: list[str]) -> dict[str, Any]:
    """Prompt-level strict accuracy (every check of a prompt passes) as IF-Eval reports it, with its
    Wilson 95% interval, plus instruction-level accuracy (each check counted on its own)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    per_prompt = [p.results(r) for p, r in zip(prompts, responses, strict=True)]
    passed = sum(all(res) for res in per_prompt)
    checks = [ok for res in per_prompt for ok in res]
    low, high = wilson_interval(passed, len(prompts))
    return {
        "instruction_pass": passed / len(prompts) if prompts else 0.0,
        "instruction_ci_low": low,
        "instruction_ci_high": high,
        "instruction_level_pass": sum(checks) / len(checks) if checks else 0.0,
        # Every prompt's id and the failed ones: the promotion gate pairs two policies prompt by prompt.
        "prompt_ids": [p.id for p in prompts],
        "failed": [p.id for p, res in zip(prompts, per_prompt, strict=True) if not all(res)],
    }


def run_probe(backend, max_new_tokens: int, batch_size: int = 8) -> dict[str, Any]:
    """Score one policy through its generation backend (oel.rollout.build_backend): greedy answers to the
    instruction prompts + log-likelihood of held-out prose."""
    from oel.ood.lm import greedy_answers, mean_loglik

    _note_ifeval()
    prompts = load_instructions()
    answers = greedy_answers(backend, [p.prompt for p in prompts], max_new_tokens, batch_size)
    scores = score_responses(prompts, answers)
    scores["loglik_nats_per_token"] = mean_loglik(backend, load_heldout_text())
    scores["samples"] = [{"id": p.id, "answer": a} for p, a in zip(prompts[:5], answers[:5], strict=True)]
    return scores


def compare_to_base(current: dict[str, Any], base: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
    """Flag forgetting: instruction pass rate down by more than `threshold` (absolute), or held-out
    log-likelihood down by more than `threshold` as a fraction of the base round's |loglik|."""
    if not base:
        return {"flag": False}
    d_pass = current["instruction_pass"] - base["instruction_pass"]
    d_ll = current["loglik_nats_per_token"] - base["loglik_nats_per_token"]
    ll_limit = threshold * abs(base["loglik_nats_per_token"])
    flag = d_pass < -threshold or d_ll < -ll_limit
    if flag:
        log.warning("OOD drop vs base: instruction pass %+.3f, held-out loglik %+.3f nats/token "
                    "(threshold %.3f absolute / %.3f nats)", d_pass, d_ll, threshold, ll_limit)
    return {"flag": flag, "instruction_pass_delta": d_pass, "loglik_delta": d_ll}


def _note_ifeval() -> None:
    # lm-eval's IF-Eval needs the package and a network download of the task data; neither is a project
    # dependency, so the shipped probe stands in for it.
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        log.info("lm-eval is not installed: skipping IF-Eval; scoring the project's own instruction probe")
        return
    log.info("lm-eval is installed, but IF-Eval needs network access to its data; the project's own probe "
             "is scored (run lm-eval by hand for IF-Eval)")

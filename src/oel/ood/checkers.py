"""Verifiable-instruction checks of the OOD probe: an adapter over IFEval's own checkers (Google's
implementation as packaged by `if-verifiable`), so the probe scores instructions as IFEval does.

CHECKERS maps the `type` of a check in oel/eval_data/instructions.jsonl to a function
(response, **kwargs) -> bool. Each IFEVAL entry builds the library's checker for its instruction id with
the kwargs translated, and returns its strict verdict (IFEval's "strict" accuracy: the answer as given).
Five checks have no IFEval instruction and stay here (OWN): numbered lines, a starting phrase, digits
present / absent, and a sentence cap (IFEval's counts sentences with nltk's punkt data, a download this
project cannot make offline).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

# our check type -> (IFEval instruction id, how our kwargs become its kwargs)
IFEVAL: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "max_words": ("length_constraints:number_words", lambda n: {"num_words": n + 1, "relation": "less than"}),
    "min_words": ("length_constraints:number_words", lambda n: {"num_words": n, "relation": "at least"}),
    "include_keywords": ("keywords:existence", lambda keywords: {"keywords": keywords}),
    "exclude_words": ("keywords:forbidden_words", lambda forbidden: {"forbidden_words": forbidden}),
    "all_lowercase": ("change_case:english_lowercase", lambda: {}),
    "all_uppercase": ("change_case:english_capital", lambda: {}),
    "bullet_count": ("detectable_format:number_bullet_lists", lambda n: {"num_bullets": n}),
    "json_output": ("detectable_format:json_format", lambda: {}),
    "no_commas": ("punctuation:no_comma", lambda: {}),
    "ends_with": ("startend:end_checker", lambda phrase: {"end_phrase": phrase}),
    "keyword_frequency": ("keywords:frequency", lambda keyword, n: {"keyword": keyword, "frequency": n,
                                                                       "relation": "at least"}),
    "wrapped_in_quotes": ("startend:quotation", lambda: {}),
    "has_title": ("detectable_format:title", lambda: {}),
    "placeholders": ("detectable_content:number_placeholders", lambda n: {"num_placeholders": n}),
    "paragraphs": ("length_constraints:number_paragraphs", lambda n: {"num_paragraphs": n}),
    "postscript": ("detectable_content:postscript", lambda marker="P.S.": {"postscript_marker": marker}),
}

NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def ifeval_check(instruction_id: str, response: str, **kwargs: Any) -> bool:
    """IFEval's strict verdict on one instruction (the library's checker class, as its evaluator builds it)."""
    import langdetect
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # the case checks ask langdetect for English; unseeded it is random
    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    checker.build_description(**kwargs)
    return bool(response.strip()) and bool(checker.check_following(response))


def _adapter(name: str) -> Callable[..., bool]:
    instruction_id, translate = IFEVAL[name]

    def check(response: str, **kwargs: Any) -> bool:
        json_keys = kwargs.pop("keys", None) if name == "json_output" else None
        ok = ifeval_check(instruction_id, response, **translate(**kwargs))
        return ok and (json_keys is None or _has_keys(response, json_keys))

    check.__name__ = name
    check.__doc__ = f"IFEval {instruction_id}"
    # The probe file's kwargs are checked against this at load time (oel.ood.probe._validate).
    extra = [inspect.Parameter("keys", inspect.Parameter.KEYWORD_ONLY, default=None)] if name == "json_output" else []
    check.__signature__ = inspect.Signature([
        inspect.Parameter("response", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(translate).parameters.values()),
        *extra])
    return check


def _has_keys(response: str, keys: list[str]) -> bool:
    import json

    text = response.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```").removesuffix("```")
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


# ---- checks IFEval does not have -------------------------------------------------------------------

def numbered_count(response: str, n: int) -> bool:
    """Exactly n numbered lines (`1.` or `1)`)."""
    return len(NUMBERED.findall(response)) == n


def starts_with(response: str, phrase: str) -> bool:
    return response.strip().strip("\"'").strip().lower().startswith(phrase.lower())


def max_sentences(response: str, n: int) -> bool:
    text = response.strip()
    count = len(SENTENCE_END.findall(text)) + (0 if not text or text[-1] in ".!?" else 1)
    return 0 < count <= n


def contains_digit(response: str) -> bool:
    return any(c.isdigit() for c in response)


def no_digits(response: str) -> bool:
    return bool(response.strip()) and not any(c.isdigit() for c in response)


OWN: dict[str, Callable[..., bool]] = {fn.__name__: fn for fn in (
    numbered_count, starts_with, max_sentences, contains_digit, no_digits)}
CHECKERS: dict[str, Callable[..., bool]] = {**{name: _adapter(name) for name in IFEVAL}, **OWN}

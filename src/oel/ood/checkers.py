"""Programmatically verifiable instructions (IF-Eval style): pure functions response -> bool.

Each checker takes the model's response and its keyword arguments from the prompt file; CHECKERS maps the
`type` field of a prompt's check to the function. Words are runs of letters, digits, apostrophes and hyphens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")
BULLET = re.compile(r"^\s*(?:[-*\u2022])\s+\S", re.MULTILINE)
NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def words(text: str) -> list[str]:
    return WORD.findall(text)


def max_words(response: str, n: int) -> bool:
    return 0 < len(words(response)) <= n


def min_words(response: str, n: int) -> bool:
    return len(words(response)) >= n


def include_keywords(response: str, keywords: list[str]) -> bool:
    """Every keyword appears as a whole word (case-insensitive)."""
    found = {w.lower() for w in words(response)}
    return all(k.lower() in found for k in keywords)


def exclude_words(response: str, forbidden: list[str]) -> bool:
    """None of the words appears (case-insensitive, whole words); an empty answer does not count."""
    found = {w.lower() for w in words(response)}
    return bool(response.strip()) and not any(w.lower() in found for w in forbidden)


def all_lowercase(response: str) -> bool:
    return any(c.isalpha() for c in response) and response == response.lower()


def all_uppercase(response: str) -> bool:
    return any(c.isalpha() for c in response) and response == response.upper()


def bullet_count(response: str, n: int) -> bool:
    """Exactly n markdown bullet lines (`- `, `* ` or `•`)."""
    return len(BULLET.findall(response)) == n


def numbered_count(response: str, n: int) -> bool:
    """Exactly n numbered lines (`1.` or `1)`)."""
    return len(NUMBERED.findall(response)) == n


def json_output(response: str, keys: list[str] | None = None) -> bool:
    """The whole answer parses as a JSON object (a ```json fence is allowed), holding `keys` if given."""
    text = response.strip()
    fenced = FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(k in obj for k in (keys or []))


def no_commas(response: str) -> bool:
    return bool(response.strip()) and "," not in response


def ends_with(response: str, phrase: str) -> bool:
    """The answer ends with the phrase (case-insensitive; trailing whitespace and quotes ignored)."""
    return response.strip().strip("\"'").strip().lower().endswith(phrase.lower())


def starts_with(response: str, phrase: str) -> bool:
    return response.strip().strip("\"'").strip().lower().startswith(phrase.lower())


def max_sentences(response: str, n: int) -> bool:
    text = response.strip()
    count = len(SENTENCE_END.findall(text)) + (0 if not text or text[-1] in ".!?" else 1)
    return 0 < count <= n


def keyword_frequency(response: str, keyword: str, n: int) -> bool:
    """The keyword appears at least n times as a whole word (case-insensitive)."""
    return sum(w.lower() == keyword.lower() for w in words(response)) >= n


def wrapped_in_quotes(response: str) -> bool:
    text = response.strip()
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"'


def has_title(response: str) -> bool:
    """A title wrapped in double angular brackets, e.g. <<my title>>."""
    return re.search(r"<<[^<>\n]+>>", response) is not None


def placeholders(response: str, n: int) -> bool:
    """At least n square-bracket placeholders such as [name]."""
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= n


def paragraphs(response: str, n: int) -> bool:
    """Exactly n paragraphs separated by a line holding only *** (the IF-Eval divider)."""
    parts = [p for p in re.split(r"^\s*\*\*\*\s*$", response.strip(), flags=re.MULTILINE)]
    return len(parts) == n and all(p.strip() for p in parts)


def contains_digit(response: str) -> bool:
    return any(c.isdigit() for c in response)


def no_digits(response: str) -> bool:
    return bool(response.strip()) and not any(c.isdigit() for c in response)


def postscript(response: str, marker: str = "P.S.") -> bool:
    """A line starting with the marker (e.g. P.S.) after some other text."""
    lines = [ln.strip() for ln in response.strip().splitlines()]
    return any(ln.startswith(marker) for ln in lines[1:]) or (
        marker in response and response.strip().index(marker) > 0)


CHECKERS: dict[str, Callable[..., bool]] = {fn.__name__: fn for fn in (
    max_words, min_words, include_keywords, exclude_words, all_lowercase, all_uppercase, bullet_count,
    numbered_count, json_output, no_commas, ends_with, starts_with, max_sentences, keyword_frequency,
    wrapped_in_quotes, has_title, placeholders, paragraphs, contains_digit, no_digits, postscript,
)}

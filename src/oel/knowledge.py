"""Experiential knowledge as text: parse items from model output, budget, dedupe, render stores.

Pure functions only (no I/O, no model): the extract and consolidate stages compose them, and the
tests drive them with hostile strings. A token counter is passed in as a plain callable.

Parsing rules (`parse_items`), applied in this order to one extractor response:

1. Thinking: only the text after the LAST ``</think>`` counts (the paper's rule). A ``<think>`` that
   never closes (the model ran out of tokens mid-reasoning) drops everything from it on: unfinished
   reasoning is not knowledge.
2. Size: only the last `MAX_RESPONSE_CHARS` of the remainder are read (before any regex runs), so a
   1 MB response costs the same as a 64 kB one. The tail, because the prompt asks for the reasoning
   first and the items last.
3. Junk characters: NUL and every other non-printable character become spaces (tabs too); then
   `oel.prompts.render.sanitize` neutralises chat control tokens (``<|im_start|>`` and friends),
   because items are pasted into the teacher's prompt. Instructions written in plain words
   ("ignore previous instructions") are data, not code: they stay text, like any other item, and
   cannot escape the knowledge block.
4. Markers: an item starts at every ``EXPERIENCE ITEM:`` marker, matched case-insensitively, with
   any spaces, ``_`` or ``-`` between the words, an optional plural ``ITEMS``, an optional bullet
   before it (``-``, ``*``, ``+``, ``•``, ``1.``, ``1)``), optional markdown emphasis around it
   (``**EXPERIENCE ITEM:**``), and ``:`` or a full-width ``：`` after it. The marker must start the
   text or follow whitespace; "EXPERIENCE:" or "ITEM:" alone is no marker. A marker may sit
   mid-line; each marker starts a new item (the paper splits to one item per line). An item runs
   to the next marker or the first blank line; its inner newlines become spaces. Text outside
   items (reasoning, preamble, the "Additional Experience" heading) is ignored.
5. Repetition loops (135M models loop): a run of 4+ back-to-back copies of the same short chunk
   (``"!!!!"``, ``"abcabcabcabc"``, digits excepted so numbers survive) collapses to one copy; then the
   item is cut before the first word 4-gram that already occurred in it - a 4-word phrase repeated
   inside one short item is almost always the start of a loop.
6. Too long: an item over `max_item_tokens` (cost of its store line, marker included) is cut at the
   last word boundary that fits. No ellipsis is added (it would cost tokens and mean nothing).
7. Empty or junk: an item with fewer than `MIN_ITEM_LETTERS` letters after the above is dropped.
8. Duplicates inside one response (same words, case/punctuation aside) keep the first copy.
9. Count: the first `max_items_per_step` surviving items are kept; the rest are dropped (counted).

A response with no surviving item adds nothing and is counted by the caller (`ParseResult.empty`).

Free-form parsing (`parse_lines`, extraction prompt v3, the reference's free-form version): the whole
text after the last ``</think>`` is the new knowledge. Rules 1-3 apply as above (the same sanitising
path), then every non-empty line is one item, so the FIFO budget keeps whole lines, as the reference's
`_truncate_experience` does for v3. Rules 5-8 apply per line; there is no marker and no item count
(rule 9 does not apply). A v3 store line is the item text itself (`render_free`).

Budget rule (`fit_to_budget`, the paper's FIFO): walking from the newest item back, whole items are
kept while their total cost fits; the first one that does not fit and every older one are dropped.
Never half an item. The cost of an item is the token count of its rendered store line (marker and
newline included), so the sum of kept costs bounds the store the teacher sees.

Dedupe rule (`dedupe_newest`, consolidate only; the paper does none): two items are near-duplicates
when the Jaccard similarity of their lower-cased word sets is >= the threshold. The NEWER one is kept:
the store is a recency cache, the newer item was written with the older one in view, and keeping it
keeps the item that survives the budget longest.

Stores (`store_text`): one "- EXPERIENCE ITEM: <text>" line per item, oldest first. A store with no
item reads EMPTY_STORE_TEXT ("No previous experience.", the paper's words for an empty store), so
every store file is usable knowledge text for the teacher and for knowledge-eval.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from oel.prompts.render import sanitize
from oel.rollout.backend import derive_seed

TokenCounter = Callable[[str], int]

MARKER = "- EXPERIENCE ITEM:"
RAW_MARKER = "- PAST GAME TRAJECTORY:"
# What the teacher reads when a store holds no item (a 135M model may write none): the paper's own
# phrase for an empty store in the extraction prompt, so the teacher prompt keeps its usual shape.
EMPTY_STORE_TEXT = "No previous experience."

MAX_RESPONSE_CHARS = 64_000
MIN_ITEM_LETTERS = 3
LOOP_NGRAM = 4

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_MARKER_RE = re.compile(
    r"(?:^|(?<=\s))(?:[-*+\u2022]|\d{1,2}[.)])?[ \t]*(?:[*_]{1,2})?[ \t]*"
    r"experience[ \t_-]*items?[ \t]*(?:[*_]{1,2})?[ \t]*[:\uff1a][ \t]*(?:[*_]{1,2}(?=\s))?",
    re.IGNORECASE,
)
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")
_CHAR_LOOP_RE = re.compile(r"(\D{1,20}?)\1{3,}")
_WORD_RE = re.compile(r"\w+")
_SPACES_RE = re.compile(r"[ \t\r\f\v]+")


@dataclass
class ParseResult:
    items: list[str] = field(default_factory=list)
    found: int = 0          # markers seen
    dropped_junk: int = 0   # empty / junk / duplicate items
    dropped_extra: int = 0  # over max_items_per_step
    cut: int = 0            # items shortened (loop or token cap)

    @property
    def empty(self) -> bool:
        return not self.items


# ---- response -> items ---------------------------------------------------------------------------

def after_thinking(text: str) -> str:
    """Text after the last </think>; an unclosed <think> and everything after it is dropped."""
    close = text.rfind(_THINK_CLOSE)
    if close >= 0:
        text = text[close + len(_THINK_CLOSE):]
    opened = text.find(_THINK_OPEN)
    return text[:opened] if opened >= 0 else text


def printable(text: str) -> str:
    """Non-printable characters (NUL, controls, format chars) -> spaces; newlines survive."""
    return "".join(ch if ch == "\n" or ch == " " or _is_printable(ch) else " " for ch in text)


def _is_printable(ch: str) -> bool:
    return ch.isprintable() and unicodedata.category(ch) not in ("Cf", "Co", "Cs")


def clean_response(text: str) -> str:
    """Rules 1-3: thinking dropped, size capped, junk characters and control tokens neutralised."""
    text = after_thinking(text or "")[-MAX_RESPONSE_CHARS:]
    return neutralize(text)


def neutralize(text: str, max_chars: int = MAX_RESPONSE_CHARS) -> str:
    """Any untrusted text made safe to paste into a prompt: junk characters and control tokens."""
    return sanitize(printable(text), max_chars=max_chars)


def split_items(text: str) -> list[str]:
    """Rule 4: raw item texts, one per marker, each up to the next marker or blank line."""
    starts = list(_MARKER_RE.finditer(text))
    items = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        body = _BLANK_LINE_RE.split(text[match.end():end], maxsplit=1)[0]
        items.append(normalize_space(body))
    return items


def normalize_space(text: str) -> str:
    return _SPACES_RE.sub(" ", text.replace("\n", " ")).strip().strip("*_ ").strip()


def cut_repetition(text: str, n: int = LOOP_NGRAM) -> str:
    """Rule 5: collapse character loops, then cut before the first repeated word n-gram."""
    text = _CHAR_LOOP_RE.sub(r"\1", text)
    words = list(_WORD_RE.finditer(text))
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(w.group().lower() for w in words[i:i + n])
        if gram in seen:
            return text[:words[i].start()].rstrip(" ,;:-")
        seen.add(gram)
    return text


def render_line(text: str) -> str:
    """One store line; its token count is the item's cost in the budget."""
    return f"{MARKER} {text}\n"


def render_free(text: str) -> str:
    """One free-form store line (prompt v3): the text itself; its token count is the item's cost."""
    return f"{text}\n"


def line_renderer(source: str, prompt_version: str) -> Callable[[str], str]:
    """How items of a store render: raw blocks, free-form lines (v3) or marker lines (v4)."""
    if source == "raw":
        return render_raw
    return render_free if prompt_version == "v3" else render_line


def render_raw(text: str) -> str:
    """One raw trajectory block (ablation `extract.source: raw`); a blank line separates blocks."""
    return f"{RAW_MARKER}\n{text}\n\n"


def cut_to_tokens(text: str, max_tokens: int, cost: TokenCounter) -> str:
    """Rule 6: the longest word-boundary prefix whose `cost` fits (binary search, few counter calls)."""
    if cost(text) <= max_tokens:
        return text
    bounds = [m.end() for m in re.finditer(r"\S+", text)]
    lo, hi = 0, len(bounds)  # invariant: prefix of `lo` words fits (0 words = "")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(text[:bounds[mid - 1]]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:bounds[lo - 1]] if lo else ""


def has_content(text: str) -> bool:
    """Rule 7: at least MIN_ITEM_LETTERS letters."""
    return sum(ch.isalpha() for ch in text) >= MIN_ITEM_LETTERS


def word_key(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD_RE.findall(text))


def parse_items(response: str, max_items: int, max_item_tokens: int, count_tokens: TokenCounter) -> ParseResult:
    """All rules, one response -> at most `max_items` clean item texts (marker not included)."""
    return _keep_items(split_items(clean_response(response)), max_items, max_item_tokens,
                       lambda t: count_tokens(render_line(t)))


def parse_lines(response: str, max_item_tokens: int, count_tokens: TokenCounter) -> ParseResult:
    """Free-form (v3): every non-empty line after thinking is one item; rules 1-3 and 5-8 apply."""
    lines = [normalize_space(line) for line in clean_response(response).split("\n")]
    return _keep_items([line for line in lines if line], None, max_item_tokens,
                       lambda t: count_tokens(render_free(t)))


def _keep_items(raw_items: list[str], max_items: int | None, max_item_tokens: int,
                cost: TokenCounter) -> ParseResult:
    """Cut loops and length, drop junk and repeats, keep at most max_items (None: no cap)."""
    result = ParseResult()
    seen: set[tuple[str, ...]] = set()
    result.found = len(raw_items)
    for raw in raw_items:
        text = cut_to_tokens(cut_repetition(raw), max_item_tokens, cost)
        if not has_content(text) or word_key(text) in seen:
            result.dropped_junk += 1
            continue
        if max_items is not None and len(result.items) >= max_items:
            result.dropped_extra += 1
            continue
        seen.add(word_key(text))
        result.cut += text != raw
        result.items.append(text)
    return result


# ---- stores --------------------------------------------------------------------------------------

def newest_within_budget(costs: Sequence[int], max_tokens: int) -> int:
    """Index of the oldest item kept: the longest suffix of whole items whose costs sum <= max_tokens."""
    total = 0
    for i in range(len(costs) - 1, -1, -1):
        total += costs[i]
        if total > max_tokens:
            return i + 1
    return 0


def fit_to_budget(items: Sequence[str], max_tokens: int, count_tokens: TokenCounter) -> list[str]:
    """Keep the newest whole items (each costing count_tokens(item)) within max_tokens; oldest dropped."""
    start = newest_within_budget([count_tokens(item) for item in items], max_tokens)
    return list(items[start:])


def jaccard(a: str, b: str) -> float:
    sa, sb = set(word_key(a)), set(word_key(b))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def dedupe_newest(items: Sequence[str], threshold: float) -> list[int]:
    """Indices (oldest first) of the items kept after near-duplicate removal; the newer copy wins."""
    kept: list[int] = []
    for i in range(len(items) - 1, -1, -1):
        if all(jaccard(items[i], items[j]) < threshold for j in kept):
            kept.append(i)
    return sorted(kept)


def store_text(lines: Sequence[str]) -> str:
    """The knowledge text the teacher reads: the rendered lines, or EMPTY_STORE_TEXT for none."""
    text = "".join(lines).strip("\n")
    return text if text else EMPTY_STORE_TEXT


def store_items(text: str) -> list[str]:
    """Item texts of a rendered knowledge store (inverse of store_text for knowledge stores)."""
    return [line[len(MARKER):].strip() for line in text.splitlines() if line.startswith(MARKER)]


# ---- seeded choices ------------------------------------------------------------------------------

def assign_store(seed: int, round_id: str, row_id: str, stores: int) -> int:
    """The store paired with one distillation row: a seeded draw per row (see oel.stages.consolidate)."""
    return random.Random(derive_seed(seed, round_id, "store", row_id)).randrange(stores)

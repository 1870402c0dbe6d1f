"""Checkers of the simulated users' hidden preferences (games/users.py): pure functions of a reply.

french        py3langid (pinned) names French as the most likely of a few European languages. The
              choice is restricted because its full 97-language model calls short English "Oui" Finnish.
one_sentence  exactly one sentence: terminal punctuation (. ! ? …) followed by more text, or a line
              break between two non-empty lines, starts another one; a trailing fragment counts.
question      the reply's last visible character (after closing quotes, brackets, emoji) is "?".
short         at most SHORT_WORDS words.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl")
SHORT_WORDS = 12

_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s+\S)")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_LETTER = re.compile(r"[^\W\d_]")
_TRAILING = re.compile(r"[\s\"'”’»)\]*_]+$")


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(LANGUAGES))
    return identifier


def language(text: str) -> str:
    """The most likely language code of `text` among LANGUAGES ("" for text without a letter)."""
    if not _LETTER.search(text):
        return ""
    return _identifier().classify(text)[0]


def sentence_count(text: str) -> int:
    """Sentences in `text`: split at terminal punctuation followed by more text and at line breaks."""
    pieces = [piece for line in text.splitlines() for piece in _SENTENCE_END.split(line)]
    return sum(1 for piece in pieces if _WORD.search(piece))


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


def is_french(text: str) -> bool:
    return language(text) == "fr"


def is_one_sentence(text: str) -> bool:
    return sentence_count(text) == 1


def ends_with_question(text: str) -> bool:
    stripped = _TRAILING.sub("", text)
    stripped = "".join(ch for ch in stripped if ch.isascii() or ch.isalnum() or ch in "?¿.!…")
    return stripped.rstrip().endswith("?")


def is_short(text: str) -> bool:
    return 0 < word_count(text) <= SHORT_WORDS


CHECKERS: dict[str, Callable[[str], bool]] = {
    "french": is_french,
    "one_sentence": is_one_sentence,
    "question": ends_with_question,
    "short": is_short,
}

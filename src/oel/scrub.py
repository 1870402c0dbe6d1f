"""Personal data out of conversations before anything is written: Presidio, with no downloaded model.

What is found (collect.scrub): e-mail addresses, phone numbers, card numbers (Luhn-checked), IBANs (checksum),
IP addresses and URLs by Presidio's own regex-and-checksum recognizers, plus deny-lists of your own terms.
Presidio's analyzer is built on its NoOpNlpEngine (2.2.366: no spaCy model is loaded, and none is needed by
these recognizers, which read no tokens), with exactly these recognizers in its registry, so nothing is
downloaded. The e-mail recognizer checks the domain with tldextract, whose default extractor fetches the public
suffix list from the network on first use and caches it in the home folder: here it reads the snapshot bundled
with tldextract only, so a scrub is the same on every machine with the same packages, online or not.

Each value found becomes `[LABEL_n]` (`[EMAIL_1]`, `[PHONE_2]`, `[PERSON_1]`): the same value (case and spacing
aside) gets the same placeholder everywhere in one Scrubber, i.e. in one round, numbered in the order values are
first met. Square brackets, not `<EMAIL_1>`: the prompt sanitiser treats tag-shaped text as a chat control token
(oel.prompts.render), and the placeholder should reach the model as the plain text it is. Overlaps are resolved
by Presidio's anonymizer (an address's domain is not also a URL).

Only conversations (game `chat`) are scrubbed: game episodes are text the games wrote.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from typing import Any

from oel.chatlog import CHAT_GAME
from oel.config import SCRUB_LABELS, ScrubParams
from oel.schemas import Episode, Message, Turn

log = logging.getLogger(__name__)


class Scrubber:
    """One round's scrub: call `text` on every string in a fixed order; `found` counts distinct values per label."""

    def __init__(self, cfg: ScrubParams):
        self.cfg = cfg
        deny = _deny_key(cfg.deny)
        self._analyzer = _analyzer(tuple(cfg.entities), deny) if cfg.entities or deny else None
        # What lies inside an allowed value stays (a kept address's domain is no URL to replace); what only
        # overlaps one does not (an allowed domain keeps no one's address at it).
        self._allow = re.compile("|".join(re.escape(v) for v in sorted(cfg.allow, key=len, reverse=True)),
                                 re.IGNORECASE) if cfg.allow else None
        self._placeholders: dict[tuple[str, str], str] = {}
        self._memo: dict[str, str] = {}  # a conversation's history recurs in every later turn's prompt
        self.found: dict[str, int] = {}

    def text(self, text: str) -> str:
        if self._analyzer is None or not text.strip():
            return text
        if (done := self._memo.get(text)) is not None:
            return done
        out = self._replace(text, _spans(self._analyzer, text, self._allow))
        self._memo[text] = out
        return out

    def value(self, value: Any) -> Any:
        """Every string inside JSON-like data (tool-call arguments are JSON text: placeholders keep it valid)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value

    def _replace(self, text: str, spans: list[tuple[int, int, str]]) -> str:
        parts, last = [], 0
        for start, end, label in spans:
            parts += [text[last:start], self._placeholder(label, text[start:end])]
            last = end
        parts.append(text[last:])
        return "".join(parts)

    def _placeholder(self, label: str, value: str) -> str:
        key = (label, _normal(label, value))
        if key not in self._placeholders:
            self.found[label] = self.found.get(label, 0) + 1
            self._placeholders[key] = f"[{label}_{self.found[label]}]"
        return self._placeholders[key]


def scrub_episodes(episodes: Iterable[Episode], cfg: ScrubParams) -> tuple[list[Episode], dict[str, int]]:
    """The episodes with every conversation's text scrubbed, in order; {label: distinct values replaced}."""
    scrubber = Scrubber(cfg)
    out = [scrub_episode(ep, scrubber) if ep.game == CHAT_GAME else ep for ep in episodes]
    if scrubber.found:
        log.info("scrubbed %s", ", ".join(f"{n} {label}" for label, n in sorted(scrubber.found.items())))
    return out, dict(sorted(scrubber.found.items()))


def scrub_episode(ep: Episode, scrubber: Scrubber) -> Episode:
    turns = [_turn(turn, scrubber) for turn in ep.turns]
    # Rebuilt through the schema: a placeholder longer than what it replaced must still fit every field.
    return Episode.model_validate({**ep.model_dump(), "turns": [t.model_dump() for t in turns],
                                   "feedback": scrubber.text(ep.feedback)})


def _turn(turn: Turn, scrubber: Scrubber) -> Turn:
    response = scrubber.text(turn.response)
    return turn.model_copy(update={
        "prompt": [_message(m, scrubber) for m in turn.prompt],
        "response": response,
        "observation": scrubber.text(turn.observation),
        "action": None if turn.action is None else scrubber.text(turn.action),
        "context": None if turn.context is None else {k: scrubber.text(v) for k, v in turn.context.items()},
        "tool_calls": scrubber.value(turn.tool_calls),
        # Token ids spell the logged text; once a placeholder replaced part of it they no longer do.
        "token_ids": turn.token_ids if response == turn.response else None,
    })


def _message(msg: Message, scrubber: Scrubber) -> Message:
    return msg.model_copy(update={"content": scrubber.text(msg.content), "tool_calls": scrubber.value(msg.tool_calls)})


# ---- Presidio ----------------------------------------------------------------------------------------------

def _deny_key(deny: dict[str, list[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    # A label with no term would be an empty alternation, which matches everywhere.
    return tuple((label, tuple(terms)) for label, terms in deny.items() if terms)


@functools.lru_cache(maxsize=4)
def _analyzer(entities: tuple[str, ...], deny: tuple[tuple[str, tuple[str, ...]], ...]) -> Any:
    """A Presidio AnalyzerEngine holding only the chosen recognizers, on the no-op NLP engine (no model)."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine

    # Its INFO lines announce engines and registries; nothing of the analysed text, but not ours to show.
    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)
    recognizers = [_builtin(name) for name in entities] + [_deny_recognizer(label, terms) for label, terms in deny]
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


def _builtin(name: str) -> Any:
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
    )

    classes = {"email": _offline_email_recognizer(), "phone": PhoneRecognizer, "card": CreditCardRecognizer,
               "iban": IbanRecognizer, "ip": IpRecognizer, "url": UrlRecognizer}
    return classes[name](supported_entity=SCRUB_LABELS[name])


@functools.cache
def _offline_email_recognizer() -> type:
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    # cache_dir=None and no URLs: the bundled public suffix snapshot, never the network or a cached download.
    suffixes = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return suffixes(pattern_text).fqdn != ""

    return OfflineEmailRecognizer


def _deny_recognizer(label: str, terms: tuple[str, ...]) -> Any:
    from presidio_analyzer import Pattern, PatternRecognizer

    # Presidio's own deny_list escapes each term whole, so "Ada Lovelace" would miss "Ada  Lovelace" or a line
    # break between the names; the same whole-word regex, with any whitespace between a term's words. Longest
    # first, so "Ada Lovelace" is taken before "Ada".
    words = [r"\s+".join(re.escape(w) for w in term.split()) for term in sorted(terms, key=len, reverse=True)]
    regex = r"(?:^|(?<=\W))(" + "|".join(words) + r")(?:(?=\W)|$)"
    return PatternRecognizer(supported_entity=label, name=f"deny {label}",
                             patterns=[Pattern(name=f"deny {label}", regex=regex, score=1.0)])


def _spans(analyzer: Any, text: str, allow: re.Pattern[str] | None) -> list[tuple[int, int, str]]:
    """(start, end, label) of what to replace, in text order, overlaps resolved by Presidio's anonymizer."""
    from presidio_anonymizer.entities import OperatorConfig

    found = analyzer.analyze(text, language="en")
    kept_whole = [m.span() for m in allow.finditer(text)] if allow else []
    found = [r for r in found if not any(start <= r.start and r.end <= end for start, end in kept_whole)]
    if not found:
        return []
    # `keep` leaves the text as it is, so the kept results' offsets are the original text's.
    kept = _anonymizer().anonymize(text, found, operators={"DEFAULT": OperatorConfig("keep")}).items
    return sorted((item.start, item.end, item.entity_type) for item in kept)


@functools.cache
def _anonymizer() -> Any:
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


def _normal(label: str, value: str) -> str:
    """The key that makes two spellings of one value share a placeholder."""
    if label in ("PHONE", "CARD"):
        return re.sub(r"\D", "", value)
    if label == "IBAN":
        return re.sub(r"\s", "", value).upper()
    return " ".join(value.split()).casefold()

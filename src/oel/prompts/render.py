"""The one render path for play prompts, and `sanitize` for every untrusted string that enters one.

Layout (the reference code's `_build_textgame_prompt`, see research/oel-paper.md "What the model sees"):
ONE user message = header line, [knowledge insert], "Current situation:", transcript, closing question.
Collect renders without knowledge; the distillation teacher and knowledge-eval render the SAME slot
values with knowledge, so student and teacher prompts differ only by the inserted paragraph.

Every slot value goes through `sanitize` inside `render_play`: game text, model output and extracted
knowledge are data and must never become chat-template control tokens (ARCHITECTURE rule 4).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources

from oel.errors import UserError
from oel.schemas import MAX_TEXT, Message

PLAY_SLOTS = ("header", "transcript", "question")   # required context keys
OPTIONAL_SLOTS = ("knowledge",)                     # present when the prompt was played with knowledge

# Per-slot character bounds; their sum (plus template text) stays under the schema's MAX_TEXT so a
# rendered prompt can always be stored.
SLOT_LIMITS = {"header": 2_000, "question": 2_000, "knowledge": 40_000, "transcript": 150_000}
DEFAULT_LIMIT = 50_000
assert sum(SLOT_LIMITS.values()) + 1_000 < MAX_TEXT

TRUNCATION_MARK = "\n...[cut]...\n"
_SLOT = re.compile(r"\{\{(\w+)\}\}")


class PromptError(UserError, ValueError):
    """A context that cannot render a prompt (missing or unknown slot)."""


# --- sanitize -------------------------------------------------------------------------------------

# NUL, C0/C1 controls (tab and newline kept), bidi overrides, BOM and lone surrogates (which cannot be
# written as UTF-8 JSON at all).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
# `<|im_start|>`, `<|eot_id|>`, DeepSeek's fullwidth `<｜...｜>`: neutralise the bracket pairs themselves,
# whatever the name, so unknown models' tokens of this family are covered too.
_PIPE_OPEN = re.compile(r"<(?=\s*[|｜])")
_PIPE_CLOSE = re.compile(r"(?<=[|｜])>")
# Tag-shaped special tokens: `<s>`, `</s>`, `<think>`, `<repo_name>`, `<start_of_turn>`, `<tool_call>`,
# `<<SYS>>`. Game boards and knowledge have no reason to contain tags, so all of them are neutralised.
_TAG = re.compile(r"<(<?/?[A-Za-z_][\w\-.:]{0,48}>?)>")
# Bracket-shaped control tokens of Mistral-style tokenizers. Plain brackets are left alone: actions
# are written `[up]`.
_BRACKET_TOKENS = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]",
                   "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[THINK]",
                   "[/THINK]")


def _neutral(token: str) -> str:
    """A visible, harmless look-alike: ASCII brackets become single guillemets / white brackets."""
    out = token.translate(str.maketrans({"<": "\u2039", ">": "\u203a", "[": "\u27e6", "]": "\u27e7"}))
    # A special string with no bracket at all: a word joiner after its first character breaks the match.
    return out if out != token else token[:1] + "\u2060" + token[1:]


def sanitize(text: str, max_chars: int = DEFAULT_LIMIT, extra_tokens: Iterable[str] = ()) -> str:
    """Make untrusted text safe to template: no control tokens, no control characters, bounded length.

    Idempotent (sanitize(sanitize(x)) == sanitize(x)), so stored slot values re-render byte-identically.
    `extra_tokens`: a tokenizer's own special strings, for models whose tokens fit no known shape.
    """
    return sanitize_report(text, max_chars, extra_tokens)[0]


# Stages count what sanitize neutralised, so hostile input shows in their summaries.
# Injection phrases are natural language: they stay (as data inside the user message) but are counted.
HOSTILE_KINDS = ("control_chars", "control_tokens", "truncated", "injection_phrases")
_INJECTION = re.compile(r"\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:the\s+)?(?:previous|prior|above|earlier)\s+"
                        r"(?:instructions|prompts?|rules)\b", re.IGNORECASE)


def sanitize_report(text: str, max_chars: int = DEFAULT_LIMIT,
                    extra_tokens: Iterable[str] = ()) -> tuple[str, dict[str, int]]:
    """`sanitize` plus what it found: {kind: count} over HOSTILE_KINDS (zero counts omitted)."""
    if not isinstance(text, str):
        raise TypeError(f"sanitize expects str, got {type(text).__name__}")
    events = {"injection_phrases": len(_INJECTION.findall(text))}
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, events["control_chars"] = _CONTROL.subn("", text)
    text, n_open = _PIPE_OPEN.subn("\u2039", text)
    text, n_close = _PIPE_CLOSE.subn("\u203a", text)
    text, n_tag = _TAG.subn(
        lambda m: "\u2039" + m.group(1).replace("<", "\u2039").replace(">", "\u203a") + "\u203a", text)
    n_bracket = 0
    for token in (*_BRACKET_TOKENS, *sorted(set(extra_tokens), key=len, reverse=True)):
        if token and token in text:
            n_bracket += text.count(token)
            text = text.replace(token, _neutral(token))
    events["control_tokens"] = max(n_open, n_close) + n_tag + n_bracket  # `<|x|>` is one token, two edits
    bounded = _bound(text, max_chars)
    events["truncated"] = int(bounded != text)
    return bounded, {k: v for k, v in events.items() if v}


def count_hostile(texts: Iterable[str], max_chars: int = DEFAULT_LIMIT) -> dict[str, int]:
    """Summed sanitize_report events over `texts`: every kind of HOSTILE_KINDS, zeros included."""
    total = dict.fromkeys(HOSTILE_KINDS, 0)
    for text in texts:
        for kind, n in sanitize_report(text, max_chars)[1].items():
            total[kind] += n
    return total


def _bound(text: str, max_chars: int) -> str:
    """Keep head and tail (a transcript's description and its latest state both matter)."""
    if len(text) <= max_chars:
        return text
    keep = max_chars - len(TRUNCATION_MARK)
    if keep <= 0:
        return text[:max_chars]
    head = keep - keep // 2
    return text[:head] + TRUNCATION_MARK + text[len(text) - keep // 2:]


# --- templates -----------------------------------------------------------------------------------

@cache
def template(name: str) -> str:
    """A template file from this package, without the editor's trailing newline."""
    text = resources.files("oel.prompts").joinpath(name).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def _fill(tmpl: str, values: Mapping[str, str]) -> str:
    # One pass: slot values are never rescanned, so `{{x}}` inside game text stays literal.
    return _SLOT.sub(lambda m: values[m.group(1)], tmpl)


def play_context(header: str, transcript: str, question: str, knowledge: str | None = None) -> dict[str, str]:
    """The slot values of a play prompt, sanitised: what Turn.context stores."""
    ctx = {"header": header, "transcript": transcript, "question": question}
    if knowledge:
        ctx["knowledge"] = knowledge
    return {k: sanitize(v, SLOT_LIMITS[k]) for k, v in ctx.items()}


def render_play(context: Mapping[str, str], knowledge: str | None = None) -> list[Message]:
    """Render the play prompt. `knowledge` (if given) overrides context["knowledge"]; "" means none.

    render_play(turn.context) == turn.prompt for every turn the engine records.
    """
    missing = [s for s in PLAY_SLOTS if s not in context]
    unknown = sorted(set(context) - set(PLAY_SLOTS) - set(OPTIONAL_SLOTS))
    if missing or unknown:
        what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise PromptError(f"play prompt context: {what} slot(s); expected {', '.join(PLAY_SLOTS)} "
                          f"(+ optional knowledge)")
    know = context.get("knowledge") if knowledge is None else knowledge
    values = play_context(context["header"], context["transcript"], context["question"], know)
    block = _fill(template("knowledge.md"), values) + "\n\n" if "knowledge" in values else ""
    return [Message(role="user", content=_fill(template("play.md"), {**values, "knowledge_block": block}))]


@cache
def _play_pattern() -> re.Pattern[str]:
    # Built from the template files themselves, so the parser can never drift from the renderer.
    shapes = {"header": r"[^\n]*", "knowledge_block": r"(?:.*?)", "transcript": r".*", "question": r".*?"}
    parts, pos = [], 0
    tmpl = template("play.md")
    for m in _SLOT.finditer(tmpl):
        parts.append(re.escape(tmpl[pos:m.start()]))
        parts.append(f"(?P<{m.group(1)}>{shapes[m.group(1)]})")
        pos = m.end()
    parts.append(re.escape(tmpl[pos:]))
    return re.compile("".join(parts), re.DOTALL)


def parse_play(prompt: list[Message]) -> dict[str, str] | None:
    """The inverse of render_play for imported logs that carry prompts but no context; None if the
    prompt is not a play prompt. Only returns contexts that re-render the prompt byte-identically."""
    if len(prompt) != 1 or prompt[0].role != "user":
        return None
    m = _play_pattern().fullmatch(prompt[0].content)
    if m is None:
        return None
    ctx = {k: m.group(k) for k in PLAY_SLOTS}
    block = m.group("knowledge_block")
    if block:
        insert = template("knowledge.md")
        head, _, tail = insert.partition("{{knowledge}}")
        if not (block.startswith(head) and block.endswith(tail + "\n\n")):
            return None
        ctx["knowledge"] = block[len(head):len(block) - len(tail) - 2]
    return ctx if render_play(ctx) == prompt else None

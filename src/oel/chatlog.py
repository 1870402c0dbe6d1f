"""OpenAI chat-completions logs <-> trajectory rows (oel.schemas.Episode), both ways, with file:line errors.

The log format, one conversation per line (what deployments log; peers ingest the same shape):

    {"id": "c-17",                                   # optional; else "<file stem>-L<line>"
     "messages": [
       {"role": "system", "content": "You are a support agent."},
       {"role": "user", "content": "Where is my order 42?"},
       {"role": "assistant", "content": null,
        "tool_calls": [{"id": "t1", "type": "function",
                        "function": {"name": "lookup", "arguments": "{\\"order\\": 42}"}}]},
       {"role": "tool", "tool_call_id": "t1", "content": "shipped 2 May"},
       {"role": "assistant", "content": "It shipped on 2 May.", "token_ids": [791, 28, 9]},
       {"role": "user", "content": "Thanks, but please answer shorter."}],
     "feedback": 0.0}                                # optional, see below

Roles: system, user, assistant, tool (`developer` reads as system, `function` as tool). `content` is a string,
null (an assistant message that only calls tools) or a list of `{"type": "text", "text": ...}` parts. An
assistant message may carry `tool_calls` (kept as logged) and `token_ids` (its generated token ids, kept).
Other keys (`tools`, `metadata`, `model`, per-message `refusal`, ...) are accepted and not used.

`feedback`: a number (a rating: reward = the number, success = rating > 0), true/false (thumbs), a text, an
object `{"rating": x, "text": "..."}`, or absent -- then the user message after the last assistant reply is the
feedback (the paper's deployment setting: the user's next message is the signal).

As an Episode (game "chat", one Turn per assistant message): turn k's `prompt` is every message before that
assistant message, system prompt included -- the partial rollout consolidate cuts; `response` its content,
`tool_calls`/`token_ids` as logged; `observation` what followed it up to the next assistant message (user
and tool contents, one per line). `seed` is a content hash, so identical conversations share a seed (and the
held-out split, which is drawn per seed, never separates them). `context` is None: a chat prompt has no
play template; the teacher gets the knowledge in its system message (`insert_system_knowledge`).

Refused, one `file:line: why` per bad record (all of them reported, nothing written): a line that is not
JSON or not an object, no `messages`, an empty conversation, no assistant reply after a user message, an
unknown role, a message above MAX_TEXT characters (a 1 MB paste), non-text content parts, bad tool_calls or
token_ids, duplicate ids. Chat control tokens in content (`<|im_start|>`, `[INST]`, ...) are neutralised
with oel.prompts.sanitize and counted in `ChatLog.hostile` -- logs are untrusted text (ARCHITECTURE rule 4);
an assistant message whose text changed loses its token ids (they no longer spell it).

Writing (`write_chatlog`, also used to export game-played episodes): a chat episode writes back the
conversation it was read from. Any other episode writes turn 0's prompt, then per turn the assistant's
response and the game's observation as the next user message; `per_turn=True` writes one record per turn
instead (its exact prompt + the response, the observation as feedback), which keeps every prompt.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from oel.artifacts import atomic_open, first_error, parse_json
from oel.errors import UserError
from oel.prompts.render import HOSTILE_KINDS, sanitize_report, template
from oel.schemas import MAX_TEXT, Episode, Message, Turn

CHAT_GAME = "chat"          # Episode.game of every conversation: stores, rows and items use it like a game
POLICY = "deployed"         # Episode.policy: the model that spoke is the deployment's, not a round's
NO_FEEDBACK = "No feedback."
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}
MAX_REPORTED = 20           # bad records listed one per line; the rest are counted


class ChatLogError(UserError, ValueError):
    """Bad records of a chat log: one `file:line: why` line each (str() joins them with newlines)."""

    def __init__(self, lines: list[str], total: int | None = None):
        self.lines = lines
        more = (total or len(lines)) - len(lines)
        super().__init__("\n".join(lines + ([f"... and {more} more bad records"] if more > 0 else [])))


@dataclass
class ChatLog:
    episodes: list[Episode]
    lines: list[int]                                    # the file line each episode came from
    hostile: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOSTILE_KINDS, 0))


# ---- reading ----------------------------------------------------------------------------------------

def is_chatlog(path: str | Path) -> bool:
    """Format sniffing for `--format auto`: the first record that parses is an object with `messages`.
    Lines that do not parse are skipped, so a chat log whose first line is broken is still read as one
    (and reports every bad record) rather than as trajectory rows that stop at line 1."""
    with Path(path).open("rb") as fh:
        for raw in fh:
            try:
                first = _json_line(raw) if raw.strip() else None
            except ValueError:
                continue
            if first is not None:
                return isinstance(first, dict) and "messages" in first and "turns" not in first
    return False


def read_chatlog(path: str | Path, round_id: str = "", split: str = "imported") -> ChatLog:
    """Every conversation of `path` as an Episode, or ChatLogError listing each bad record as file:line."""
    path = Path(path)
    if not path.is_file():
        raise ChatLogError([f"{path}: no such file"])
    log = ChatLog([], [])
    errors: list[str] = []
    seen: dict[str, int] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = _json_line(raw)
                ep, events = record_to_episode(obj, f"{path.stem}-L{lineno}", round_id, split)
                if ep.episode_id in seen:
                    raise ValueError(f"id {ep.episode_id!r} already used on line {seen[ep.episode_id]}")
            except ValidationError as err:  # a value the Episode schema refuses: its field, on one line
                errors.append(f"{path}:{lineno}: {first_error(err)}")
                continue
            except ValueError as err:
                errors.append(f"{path}:{lineno}: {err}")
                continue
            seen[ep.episode_id] = lineno
            log.episodes.append(ep)
            log.lines.append(lineno)
            for kind, n in events.items():
                log.hostile[kind] += n
    if errors:
        raise ChatLogError(errors[:MAX_REPORTED], len(errors))
    if not log.episodes:
        raise ChatLogError([f"{path}: holds no conversation; nothing to import"])
    return log


def _json_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        return parse_json(text)  # nesting beyond MAX_DEPTH is a ValueError, never a RecursionError
    except json.JSONDecodeError as err:
        cut = " (truncated line?)" if not raw.endswith(b"\n") else ""
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno}){cut}") from None


def record_to_episode(obj: Any, default_id: str, round_id: str = "", split: str = "imported"
                      ) -> tuple[Episode, dict[str, int]]:
    """One log record -> (Episode, sanitize events). ValueError names the field and what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with `messages`, found {type(obj).__name__}")
    if "messages" not in obj:
        hint = " (this looks like an OEL trajectory row: use --format oel)" if "turns" in obj else ""
        raise ValueError(f"no `messages` key{hint}")
    raw_messages = obj["messages"]
    if not isinstance(raw_messages, list):
        raise ValueError(f"`messages` must be a list, found {type(raw_messages).__name__}")
    if not raw_messages:
        raise ValueError("empty conversation (`messages` is [])")
    events = dict.fromkeys(HOSTILE_KINDS, 0)
    parsed = [_message(m, i, events) for i, m in enumerate(raw_messages)]
    messages = [msg for msg, _ in parsed]
    turns = _turns(messages, [ids for _, ids in parsed])
    reward, success, feedback = _feedback(obj.get("feedback"), turns)
    ep_id = obj.get("id", default_id)
    if not isinstance(ep_id, str | int) or isinstance(ep_id, bool) or not str(ep_id).strip():
        raise ValueError("`id` must be a non-empty string or number")
    return Episode(episode_id=str(ep_id), game=CHAT_GAME, seed=conversation_seed(messages), split=split,
                   round=round_id, policy=POLICY, turns=turns, success=success, reward=reward,
                   feedback=feedback), {k: v for k, v in events.items() if v}


def _message(m: Any, i: int, events: dict[str, int]) -> tuple[Message, list[int] | None]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object with role and content, found {type(m).__name__}")
    role = ROLE_ALIASES.get(m.get("role")) if isinstance(m.get("role"), str) else None
    if role is None:
        raise ValueError(f"{where}.role {m.get('role')!r} is not one of system, user, assistant, tool")
    content = _content(m.get("content"), f"{where}.content")
    clean = _clean(content, f"{where}.content", events)
    tool_calls = _tool_calls(m.get("tool_calls"), where) if role == "assistant" else None
    if role == "assistant" and not clean.strip() and not tool_calls:
        raise ValueError(f"{where}: an assistant message with no content and no tool_calls")
    ids = _token_ids(m.get("token_ids"), where) if role == "assistant" else None
    if ids is not None and clean != content:
        ids = None  # neutralising changed the text; the logged ids no longer spell it
    extra = {key: _clean(str(m[key]), f"{where}.{key}", events)[:200]
             for key in ("tool_call_id", "name") if m.get(key) is not None and role == "tool"}
    return Message(role=role, content=clean, tool_calls=tool_calls, **extra), ids


def _content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # the parts form: text parts only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where}[{j}]: only text parts can be learned from, found {kind!r}")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise ValueError(f"{where} must be a string, null or a list of text parts, found {type(content).__name__}")
    if len(content) > MAX_TEXT:
        raise ValueError(f"{where} is {len(content):,} characters; at most {MAX_TEXT:,} are accepted "
                         "(trim or split the message)")
    return content


def _clean(text: str, where: str, events: dict[str, int]) -> str:
    # No length cut (checked above): only control tokens and control characters are replaced.
    clean, found = sanitize_report(text, max_chars=2 * len(text) + 16)
    for kind, n in found.items():
        events[kind] += n
    return clean


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]] | None:
    if calls is None:
        return None
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ValueError(f"{where}.tool_calls must be a list of objects")
    if len(json.dumps(calls)) > MAX_TEXT:
        raise ValueError(f"{where}.tool_calls is longer than {MAX_TEXT:,} characters")
    return calls or None


def _token_ids(ids: Any, where: str) -> list[int] | None:
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{where}.token_ids must be a list of non-negative integers")
    return ids


def _turns(messages: list[Message], ids: list[list[int] | None]) -> list[Turn]:
    """One Turn per assistant message that answers a user: its prompt is every message before it."""
    turns: list[Turn] = []
    for i, msg in enumerate(messages):
        if msg.role != "assistant" or not any(m.role == "user" for m in messages[:i]):
            continue
        nxt = next((j for j in range(i + 1, len(messages)) if messages[j].role == "assistant"), len(messages))
        observation = "\n".join(m.content for m in messages[i + 1:nxt])
        turns.append(Turn(index=len(turns), prompt=messages[:i], response=msg.content, valid=True,
                          observation=observation[:MAX_TEXT], response_tokens=len(ids[i] or []),
                          tool_calls=msg.tool_calls, token_ids=ids[i]))
    if not turns:
        raise ValueError("no assistant reply after a user message: nothing the model said to learn from")
    return turns


def _feedback(raw: Any, turns: list[Turn]) -> tuple[float, bool, str]:
    """(reward, success, feedback text); absent feedback = the user's message after the last reply."""
    rating, text = None, None
    if isinstance(raw, dict):
        rating, text = raw.get("rating", raw.get("score")), raw.get("text", raw.get("comment"))
    elif isinstance(raw, bool | int | float):
        rating = raw
    elif isinstance(raw, str):
        text = raw
    elif raw is not None:
        raise ValueError(f"`feedback` must be a number, true/false, a text or an object, found {type(raw).__name__}")
    if rating is not None and not isinstance(rating, bool | int | float):
        raise ValueError("`feedback.rating` must be a number or true/false")
    if text is not None and not isinstance(text, str):
        raise ValueError("`feedback.text` must be a string")
    reward = float(rating) if rating is not None else 0.0
    if text is None:  # the user's next message is the feedback; a bare rating is said in words
        text = turns[-1].observation or ("" if rating is None else f"Rating: {rating}")
    text = sanitize_report(text, MAX_TEXT)[0].strip() or NO_FEEDBACK
    return reward, reward > 0, text


def conversation_seed(messages: list[Message]) -> int:
    """A stable 31-bit hash of the conversation's content (role + text of every message)."""
    key = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)
    return zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF


# ---- what the stages use --------------------------------------------------------------------------

def is_chat(episode: Episode) -> bool:
    return episode.game == CHAT_GAME


def render_conversation(episode: Episode) -> str:
    """The conversation as text for the extractor: `Role: content` lines, then the feedback."""
    lines = [f"{m.role.capitalize()}: {_calls_text(m.content, m.tool_calls)}" for m in conversation(episode)]
    lines.append(f"Feedback: {episode.feedback}" + (f" (rating {episode.reward:g})" if episode.reward else ""))
    return "\n".join(lines)


def _calls_text(content: str, calls: list[dict[str, Any]] | None) -> str:
    named = [str((c.get("function") or {}).get("name", "?")) for c in calls or []]
    return content + (f" [calls {', '.join(named)}]" if named else "")


def insert_system_knowledge(prompt: list[Message], knowledge: str) -> list[Message]:
    """The teacher's prompt of a chat turn: the knowledge paragraph appended to the system message
    (a system message holding only it when the conversation has none); nothing else changes."""
    from oel.prompts.render import SLOT_LIMITS, sanitize

    block = template("knowledge_chat.md").replace("{{knowledge}}", sanitize(knowledge, SLOT_LIMITS["knowledge"]))
    if prompt and prompt[0].role == "system":
        first = prompt[0]
        joined = f"{first.content}\n\n{block}" if first.content.strip() else block
        return [first.model_copy(update={"content": joined}), *prompt[1:]]
    return [Message(role="system", content=block), *prompt]


# ---- writing ----------------------------------------------------------------------------------------

def conversation(episode: Episode) -> list[Message]:
    """The whole conversation of a chat episode (its last prompt, the last reply, what followed)."""
    if not episode.turns:
        return []
    last = episode.turns[-1]
    messages = [*last.prompt, _reply(last)]
    if last.observation:
        messages.append(Message(role="user", content=last.observation))
    return messages


def _reply(turn: Turn) -> Message:
    return Message(role="assistant", content=turn.response, tool_calls=turn.tool_calls)


def _is_cumulative(episode: Episode) -> bool:
    """Chat-shaped: every turn's prompt extends the previous prompt by that turn's reply and more."""
    turns = episode.turns
    return all(b.prompt[:len(a.prompt) + 1] == [*a.prompt, _reply(a)] for a, b in zip(turns, turns[1:], strict=False))


def episode_to_records(episode: Episode, per_turn: bool = False) -> list[dict[str, Any]]:
    """The log record(s) of one episode (see the module docstring for the shapes)."""
    if per_turn:
        return [_record(f"{episode.episode_id}/t{t.index}", [*t.prompt, _reply(t)], [t], t.observation or None,
                        None) for t in episode.turns]
    turns = episode.turns
    if _is_cumulative(episode):
        messages = conversation(episode)
    else:
        messages = list(turns[0].prompt) if turns else []
        for turn in turns:
            messages.append(_reply(turn))
            if turn.observation:
                messages.append(Message(role="user", content=turn.observation))
    trailing = turns[-1].observation if turns else ""
    text = None if episode.feedback in (trailing, NO_FEEDBACK) else episode.feedback
    rating = episode.reward if (episode.reward or episode.success) else None
    return [_record(episode.episode_id, messages, turns, text, rating)]


def _record(rid: str, messages: list[Message], turns: list[Turn], text: str | None,
            rating: float | None) -> dict[str, Any]:
    out_msgs = [m.model_dump(mode="json") for m in messages]
    ids, answered = iter(t.token_ids for t in turns), False
    for msg in out_msgs:  # token ids go back on the assistant messages that are turns (after a user)
        answered = answered or msg["role"] == "user"
        if msg["role"] == "assistant" and answered:
            tok = next(ids, None)
            if tok is not None:
                msg["token_ids"] = tok
        if msg["role"] == "assistant" and not msg["content"] and msg.get("tool_calls"):
            msg["content"] = None
    record: dict[str, Any] = {"id": rid, "messages": out_msgs}
    if rating is not None:
        record["feedback"] = {"rating": rating, **({"text": text} if text else {})}
    elif text:
        record["feedback"] = text
    return record


def write_chatlog(path: str | Path, episodes: Iterable[Episode], per_turn: bool = False) -> int:
    """Write episodes as OpenAI chat JSONL, atomically; returns the number of records."""
    n = 0
    with atomic_open(path) as fh:
        for episode in episodes:
            for record in episode_to_records(episode, per_turn):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
    return n


def round_domains(episodes: Iterable[Episode], enabled_games: list[str]) -> list[str]:
    """What a round's knowledge is kept per (stores are per game): the enabled games when the round played
    games, plus `chat` when it holds chat logs -- `chat` alone for a round on imported logs."""
    games = {ep.game for ep in episodes}
    chat = [CHAT_GAME] if CHAT_GAME in games else []
    return ([*enabled_games] if games - {CHAT_GAME} or not chat else []) + chat

"""consolidate: the final knowledge stores the teacher reads, and the distillation set.

Stores are per game (data/<r>/knowledge/stores/<game>/store-<k>.md, K = `extract.stores` for every
enabled game): each store's item history from items.jsonl (items record their game), near-duplicates
removed when `consolidate.dedupe` (newer copy kept, see oel.knowledge), then cut to
`extract.max_knowledge_tokens` by dropping the oldest whole items. The file is exactly the knowledge
text the teacher reads (byte for byte, no trailing newline): one "- EXPERIENCE ITEM: ..." line per
item (prompt v3: one free-form line per item; raw ablation: one "- PAST GAME TRAJECTORY:" block per
trajectory, never deduped, transcripts of one game share most words). Without dedupe the store equals extract's live store at its last step (same FIFO rule).
Dedupe frees budget, so an item extract had evicted can come back: the store is "the newest distinct
items that fit". An EMPTY store (a 135M extractor may write no valid item) holds the single line
"No previous experience." (the paper's own words for an empty store): the teacher then sees the
knowledge paragraph with that sentence, its prompt keeps the same shape, and the summary counts
both the empty stores and the rows paired with one.

Distillation set (data/<r>/distill.jsonl), the paper's partial rollouts: every turn prompt of the
user-side episodes (split "user" or "imported"; every episode when none has those splits), as the
student saw it (`prompt` is the logged turn prompt, byte-identical), each paired with a store OF ITS
OWN GAME (`DistillRow.game`, `DistillRow.store` = k among that game's stores) drawn by a seeded rng
per row, seeded from (params.seed, round, row id). A row whose game has no store (a game params do
not enable) is an error naming the game: never a fallback to another game's knowledge. The reference draws per batch
step from an rng seeded by (step + 1000*round); a per-row seed keeps the pairing stable when
max_rows or the row order change, and still differs between rounds.

`teacher_prompt` = render_play(turn.context, knowledge=store text): the same render path as the
student, knowledge paragraph inserted after the header. Fallback, counted as `teacher_inserted`:
when a turn has no context (imported logs) or its context no longer re-renders to the logged prompt
(the template changed since collection), the knowledge paragraph is inserted into the logged prompt
itself after the first line of its first user message, where the header is.

Chat logs (game `chat`, oel.chatlog; a round on imported logs keeps its stores under `chat`): a turn's
prompt is every logged message before that assistant reply (system prompt included), and the teacher
reads the same messages with the knowledge paragraph (prompts/knowledge_chat.md) appended to the system
message, counted as `teacher_system`. Held-out conversations (split `heldout`) never become rows.

`consolidate.max_rows` > 0 keeps a seeded random subset of that many rows, in their original order.
No model is loaded: item costs were counted by extract.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

from oel import tracking
from oel.artifacts import read_jsonl, write_jsonl, write_text
from oel.chatlog import insert_system_knowledge, is_chat, round_domains
from oel.config import Params
from oel.errors import UserError
from oel.knowledge import assign_store, dedupe_newest, line_renderer, newest_within_budget, store_text
from oel.paths import RoundPaths
from oel.prompts.render import (
    HOSTILE_KINDS,
    SLOT_LIMITS,
    parse_play,
    render_play,
    sanitize,
    sanitize_report,
    template,
)
from oel.rollout.backend import derive_seed
from oel.schemas import DistillRow, Episode, KnowledgeItem, Message, Turn
from oel.transcripts import turn_context

log = logging.getLogger(__name__)

USER_SPLITS = ("user", "imported")


@dataclass(frozen=True)
class FinalStore:
    game: str
    k: int              # index among its game's stores
    items: list[KnowledgeItem]
    history: int        # items extract wrote for this store
    deduped: int        # near-duplicates removed
    dropped_budget: int
    text: str           # what the teacher reads

    def summary(self) -> dict[str, int]:
        return {"history": self.history, "items": len(self.items), "deduped": self.deduped,
                "dropped_budget": self.dropped_budget, "tokens": sum(i.tokens for i in self.items),
                "empty": int(not self.items)}


Knowledge = dict[str, list[str]]  # game -> the teacher's text of each of its stores, by k


def run(params: Params, paths: RoundPaths) -> dict[str, Any]:
    """items.jsonl -> budgeted stores per game; trajectories.jsonl -> distill.jsonl (partial rollouts + store)."""
    # Both inputs are read (and validated) before anything is written: a corrupt trajectories.jsonl must not
    # leave freshly rewritten stores behind.
    items, all_episodes = read_jsonl(paths.items, KnowledgeItem), read_jsonl(paths.trajectories, Episode)
    stores = build_stores(items, params, round_domains(all_episodes, params.games.enabled()))
    write_stores(stores, paths)
    episodes, split = user_side(all_episodes)
    rows, stats = distill_rows(episodes, knowledge_of(stores), params, paths.round_id)
    write_jsonl(paths.distill_rows, rows)
    summary = summarize(stores, rows, stats, split, params)
    log_stores(paths, stores)
    return summary


# ---- stores ---------------------------------------------------------------------------------------

def build_stores(items: list[KnowledgeItem], params: Params, games: list[str] | None = None) -> list[FinalStore]:
    """K stores for every enabled game (or `games`: `chat` for a round on logs), each from its (game, k) items."""
    games = params.games.enabled() if games is None else games
    check_items(items, games, params.extract.stores)
    return [final_store(game, k, [item for item in items if item.game == game and item.store == k], params)
            for game in games for k in range(params.extract.stores)]


def check_items(items: list[KnowledgeItem], games: list[str], stores: int) -> None:
    """items.jsonl must come from the current extract: items with a game params enable, k < stores."""
    rerun = "rerun `oel extract` with the current params"
    if any(item.game is None for item in items):
        raise UserError(f"items.jsonl has items without a game (written before knowledge was per game); {rerun}")
    foreign = sorted({item.game for item in items} - set(games))
    if foreign:
        raise UserError(f"items.jsonl has knowledge of game {foreign[0]!r}, which params do not enable; {rerun}")
    k_max = max((item.store for item in items), default=-1)
    if k_max >= stores:
        raise UserError(f"items.jsonl has store {k_max} but extract.stores is {stores}; {rerun}")


def final_store(game: str, k: int, history: list[KnowledgeItem], params: Params) -> FinalStore:
    """Dedupe (knowledge only, if enabled), then the FIFO budget; render the teacher's text."""
    raw = params.extract.source == "raw"
    cfg = params.consolidate
    keep = range(len(history))
    if cfg.dedupe and not raw:
        keep = dedupe_newest([item.text for item in history], cfg.dedupe_threshold)
    unique = [history[i] for i in keep]
    start = newest_within_budget([item.tokens for item in unique], params.extract.max_knowledge_tokens)
    kept = unique[start:]
    line = line_renderer(params.extract.source, params.extract.prompt_version)
    return FinalStore(game, k, kept, len(history), len(history) - len(unique), start,
                      store_text([line(item.text) for item in kept]))


def knowledge_of(stores: list[FinalStore]) -> Knowledge:
    out: Knowledge = {}
    for store in stores:
        out.setdefault(store.game, []).append(store.text)
    return out


def write_stores(stores: list[FinalStore], paths: RoundPaths) -> None:
    for store in stores:
        # No trailing newline: the file's bytes ARE the knowledge text (eval reads it with read_text).
        write_text(paths.store(store.game, store.k), store.text)
    # A rerun with fewer stores or games (or a folder in the old, pooled layout) must not leave a stale
    # store file for distill or eval to pick up.
    wanted = {paths.store(store.game, store.k) for store in stores}
    for stale in paths.stores.rglob("store-*.md"):
        if stale not in wanted:
            stale.unlink()
    for folder in paths.stores.iterdir():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ---- distillation rows ----------------------------------------------------------------------------

def user_side(episodes: list[Episode]) -> tuple[list[Episode], str]:
    if not episodes:
        raise UserError("trajectories.jsonl holds no episode; run `oel collect` (or import trajectories) first")
    chosen = [ep for ep in episodes if ep.split in USER_SPLITS]
    if chosen:
        return chosen, "user"
    log.warning("no episode of split user/imported; every episode's turns become distillation rows")
    return [ep for ep in episodes if ep.split != "heldout"], "all"  # held-out logs are eval only


def row_id(episode: Episode, turn: Turn) -> str:
    return f"{episode.episode_id}/t{turn.index}"


def selected_turns(episodes: list[Episode], params: Params, round_id: str) -> list[tuple[Episode, Turn]]:
    """Every (episode, turn), or a seeded subset of max_rows of them in original order."""
    pairs = [(ep, turn) for ep in episodes for turn in ep.turns]
    cap = params.consolidate.max_rows
    if cap == 0 or cap >= len(pairs):
        return pairs
    picked = random.Random(derive_seed(params.seed, round_id, "rows")).sample(range(len(pairs)), cap)
    return [pairs[i] for i in sorted(picked)]


def distill_rows(episodes: list[Episode], knowledge: Knowledge, params: Params,
                 round_id: str) -> tuple[list[DistillRow], dict[str, int]]:
    """One row per selected turn; its teacher reads a store of the row's own game."""
    check_games(episodes, knowledge)
    stats = {"turns_total": sum(len(ep.turns) for ep in episodes), "teacher_rendered": 0, "teacher_inserted": 0,
             "teacher_system": 0}
    hostile = dict.fromkeys(HOSTILE_KINDS, 0)
    for text in (text for texts in knowledge.values() for text in texts):  # every store text a teacher reads
        _add(hostile, sanitize_report(text, SLOT_LIMITS["knowledge"])[1])
    rows = []
    for episode, turn in selected_turns(episodes, params, round_id):
        rid = row_id(episode, turn)
        # The logged prompt goes into distill.jsonl verbatim, so a hand-written or edited trajectory holding
        # `<|im_start|>system` would reach the distill tokenizer as real control tokens.
        # Sanitise it like the rollout backend did when the policy played it (idempotent: clean prompts stay
        # byte-identical), and count what was neutralised.
        turn = _clean_turn(turn, hostile)
        own = knowledge[episode.game]
        k = assign_store(params.seed, round_id, rid, len(own))
        # A chat-log turn has no play template: its teacher reads the knowledge in the system message.
        teacher, how = ((insert_system_knowledge(turn.prompt, own[k]), "system") if is_chat(episode)
                        else teacher_prompt(turn, own[k]))
        stats[f"teacher_{how}"] += 1
        rows.append(DistillRow(row_id=rid, episode_id=episode.episode_id, game=episode.game, turn=turn.index,
                               store=k, prompt=turn.prompt, teacher_prompt=teacher))
    return rows, {**stats, "hostile_events": hostile}


def check_games(episodes: list[Episode], knowledge: Knowledge) -> None:
    """Every user-side game has stores of its own; another game's knowledge is never a fallback."""
    missing = sorted({ep.game for ep in episodes} - set(knowledge))
    if missing:
        raise UserError(f"trajectories.jsonl has user-side episodes of game {missing[0]!r}, which has no knowledge "
                        f"store (stores exist for {', '.join(knowledge) or 'no game'}); enable {missing[0]} under "
                        f"`games` and rerun `oel extract`, or collect again without it")


def _add(total: dict[str, int], events: dict[str, int]) -> None:
    for kind, n in events.items():
        total[kind] += n


def _clean_turn(turn: Turn, hostile: dict[str, int]) -> Turn:
    """The turn with sanitised prompt contents; events of its prompt and its context slots added to `hostile`."""
    prompt = []
    for msg in turn.prompt:
        # No length cut here (a prompt is as long as it was played); sanitize only replaces characters.
        clean, events = sanitize_report(msg.content, max_chars=2 * len(msg.content) + 16)
        _add(hostile, events)
        prompt.append(msg if clean == msg.content else msg.model_copy(update={"content": clean}))
    for key, value in (turn.context or {}).items():
        _add(hostile, sanitize_report(value, SLOT_LIMITS.get(key, len(value) + 1))[1])
    return turn if prompt == turn.prompt else turn.model_copy(update={"prompt": prompt})


def teacher_prompt(turn: Turn, knowledge: str) -> tuple[list[Message], str]:
    """(teacher messages, "rendered" | "inserted"); the render path whenever a context reproduces the prompt."""
    context = turn_context(turn)
    if context is not None and render_play(context) == turn.prompt:
        return render_play(context, knowledge=knowledge), "rendered"
    if turn.context is not None:  # the template changed since collection: try the logged prompt itself
        context = parse_play(turn.prompt)
        if context is not None:
            return render_play(context, knowledge=knowledge), "rendered"
    return insert_knowledge(turn.prompt, knowledge), "inserted"


def insert_knowledge(prompt: list[Message], knowledge: str) -> list[Message]:
    """Fallback for prompts that are not play prompts: the knowledge paragraph after the header line.

    The one place a prompt is edited as a string: the logged prompt is all there is. The paragraph
    (the play template's own knowledge.md, sanitised as render_play does) goes after the first line
    of the first user message and the blank lines following it, as in the paper's teacher prompt;
    nothing else of the prompt changes.
    """
    block = template("knowledge.md").replace("{{knowledge}}", sanitize(knowledge, SLOT_LIMITS["knowledge"]))
    out = list(prompt)
    for i, msg in enumerate(out):
        if msg.role == "user":
            out[i] = Message(role="user", content=_insert_after_header(msg.content, block))
            break
    return out


def _insert_after_header(content: str, block: str) -> str:
    end = content.find("\n")
    if end < 0:
        return f"{content}\n\n{block}"
    pos = end + 1
    while content.startswith("\n", pos):  # keep the header's blank line(s) above the paragraph
        pos += 1
    return f"{content[:pos]}{block}\n\n{content[pos:]}"


# ---- outputs --------------------------------------------------------------------------------------

def summarize(stores: list[FinalStore], rows: list[DistillRow], stats: dict[str, int], split: str,
              params: Params) -> dict[str, Any]:
    """Totals, then per game (stores.<game>.<k>, with the rows that read each store)."""
    empty = {(store.game, store.k) for store in stores if not store.items}
    per_store: dict[str, dict[str, Any]] = {}
    for store in stores:
        per_store.setdefault(store.game, {})[str(store.k)] = {
            **store.summary(), "rows": sum(row.game == store.game and row.store == store.k for row in rows)}
    return {"source": params.extract.source, "user_split": split, "rows": len(rows), **stats,
            "empty_stores": len(empty), "rows_with_empty_store": sum((row.game, row.store) in empty for row in rows),
            "deduped": sum(store.deduped for store in stores),
            "rows_per_game": {game: sum(row.game == game for row in rows) for game in per_store},
            "stores": per_store}


def log_stores(paths: RoundPaths, stores: list[FinalStore]) -> None:
    for store in stores:
        tracking.log_artifact(paths.store(store.game, store.k), f"stores/{store.game}")

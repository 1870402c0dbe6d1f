"""extract: the model writes experiential knowledge from its own trajectories into K stores PER GAME.

Knowledge is per game (the reference runs one environment per experiment): every enabled game gets
its own K stores, and a store reads only that game's trajectories. Every item records its `game`;
consolidate writes data/<r>/knowledge/stores/<game>/store-<k>.md, a distillation row's teacher reads
a store of the row's own game, and eval's teacher level plays each game with that game's stores.

Per store and step t, the extractor reads ONE trajectory (as a "Round{k}_Input/Output" transcript
with the final feedback) plus the store so far (`extract.with_previous`), and writes new knowledge.
Items are appended; the store is cut to `max_knowledge_tokens` by dropping the oldest whole items
(the paper's FIFO). All stores of all games run in parallel: one batched generate call per step.

Prompt versions (`extract.prompt_version`, templates in oel/prompts/):
  v4  (default) 1 to `max_items_per_step` items, each a line starting "- EXPERIENCE ITEM:"; only marked
      items count (oel.knowledge.parse_items). `prefill_marker` starts the answer with the marker.
  v3  the reference's free-form version: no item count, no marker. The whole response after the
      last </think> is the new knowledge, one item per non-empty line (oel.knowledge.parse_lines), so
      the FIFO keeps whole lines as the reference's `_truncate_experience` does; `prefill_marker` is
      ignored. Both go through the same sanitising path.

Which trajectories: a game's episodes of split "extract" (collect plays them with
`collect.extraction_sampling`, the reference's validate-mode sampling). When a game has none (e.g.
imported logs only), all of that game's episodes are used and its summary says `pool_split: all`.
An enabled game with no episode at all is an error (collect it or disable it).

How trajectories are assigned to stores, per game, with pool size N, K = `extract.stores` and
T = `extract.steps`:
  N >= K*T  store k reads the disjoint block pool[k*T:(k+1)*T] (the pool in collect's seed order):
            the stores are independent runs on their own fresh games, like the reference's 10
            sampling seeds that each play their own extraction maps.
  N <  K*T  each store cycles over the pool in its own seeded order (seeded by seed, round, game, k),
            so stores share trajectories; extract_summary.json says `stores_share_trajectories: true`
            (top level and per game) and one warning line names the games and the count needed.

Sampling seeds: one generate call per step gets the seed derived from (seed, round, step); within
the batch every row draws its own tokens, so the stores are independent samples. A store's output
therefore depends on the batch it ran in, not on (game, k) alone (the backend takes one seed per call).

Token costs (the budget) are counted with the POLICY's tokenizer even when `extract.extractor` names
another model: the store is what the policy-as-teacher reads.

Modes:
  source: knowledge, extractor: policy   the paper's on-policy default
  source: knowledge, extractor: <spec>   another model writes the knowledge (off-policy source ablation)
  source: raw                            no model: each trajectory's transcript is one "item" (raw ablation)
  source: file                           no model: every line of `extract.knowledge_file` is one item of
                                         every store of every game (OPCD's system-prompt distillation;
                                         an operator's known policy consolidated into the weights)

Writes data/<r>/knowledge/items.jsonl (every item ever written, in order, each with game/store/step/
source episode and `tokens` = its cost in the store) and extract_summary.json.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from oel import tracking
from oel.artifacts import read_jsonl, write_json, write_jsonl, write_text
from oel.chatlog import round_domains
from oel.config import Params
from oel.errors import UserError
from oel.games.users import CONVERSATIONS
from oel.knowledge import (
    MARKER,
    ParseResult,
    line_renderer,
    neutralize,
    newest_within_budget,
    normalize_space,
    parse_items,
    parse_lines,
    render_line,
    render_raw,
    store_text,
)
from oel.paths import RoundPaths
from oel.prompts.render import SLOT_LIMITS, count_hostile
from oel.rollout.backend import Backend, derive_seed
from oel.schemas import Episode, KnowledgeItem, Message
from oel.transcripts import extraction_prompt, fit_transcript, render_transcript, template_version

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]
SAMPLE_ITEMS = 20  # items logged to MLflow per store


@dataclass(frozen=True)
class Pool:
    """One game's extraction trajectories."""

    game: str
    episodes: list[Episode]
    split: str  # "extract", or "all" when the game has no episode of split extract


@dataclass
class Store:
    """One store's history and live window, plus the counters of its summary."""

    game: str
    k: int                         # index among the stores of its game
    order: list[Episode]           # what it reads, step by step (cycled when shorter than steps)
    shares: bool = False           # True: the game's pool was too small for disjoint blocks
    history: list[KnowledgeItem] = field(default_factory=list)
    start: int = 0                 # history[start:] is the live (budgeted) store; FIFO, never moves back
    responses: int = 0
    empty_responses: int = 0
    dropped_parse: int = 0
    cut_items: int = 0
    generated_tokens: int = 0
    raw_responses: list[str] = field(default_factory=list)  # extractor output as generated (hostile counts)
    calls: list[dict[str, Any]] = field(default_factory=list)  # each generate row, for MLflow traces only

    def episode_at(self, step: int) -> Episode:
        return self.order[step % len(self.order)]

    def live(self) -> list[KnowledgeItem]:
        return self.history[self.start:]

    def text(self, lines: Callable[[str], str] = render_line) -> str:
        return store_text([lines(item.text) for item in self.live()])

    def append(self, new: list[KnowledgeItem], max_tokens: int) -> None:
        self.history.extend(new)
        self.start += newest_within_budget([item.tokens for item in self.live()], max_tokens)

    def summary(self) -> dict[str, int]:
        return {"items_added": len(self.history), "items_kept": len(self.live()),
                "dropped_budget": self.start, "dropped_parse": self.dropped_parse,
                "cut_items": self.cut_items, "responses": self.responses,
                "empty_responses": self.empty_responses, "generated_tokens": self.generated_tokens,
                "store_tokens": sum(item.tokens for item in self.live())}


def run(params: Params, paths: RoundPaths, backend: Backend | None = None) -> dict[str, Any]:
    """Read trajectories, fill K stores per game, write items.jsonl + extract_summary.json, log to MLflow."""
    episodes = read_jsonl(paths.trajectories, Episode)
    pools = extraction_pools(episodes, round_domains(episodes, params.games.enabled()))  # `chat` for logs
    stores = new_stores(pools, params, paths.round_id)
    if params.extract.source != "file":  # a file's items read no trajectory
        warn_shared(pools, params)
    start = time.time_ns()
    if params.extract.source == "raw":
        fill_raw(stores, params, policy_token_counter(params, paths.root))
    elif params.extract.source == "file":
        fill_file(stores, params, paths.root, policy_token_counter(params, paths.root))
    else:
        backend = backend or extractor_backend(params, paths)
        fill_knowledge(stores, backend, budget_counter(backend, params, paths), params, paths.round_id)
    window = (start, time.time_ns())
    write_jsonl(paths.items, [item for store in stores for item in store.history])
    summary = summarize(stores, params, pools)
    summary["hostile_events"] = hostile_events([ep for pool in pools for ep in pool.episodes], stores)
    write_json(paths.extract_summary, summary)
    log_stores(stores, params)
    tracking.log_extraction_traces(params, paths.round_id, [c for s in stores for c in s.calls], window)
    return summary


# ---- inputs ---------------------------------------------------------------------------------------

def extraction_pools(episodes: list[Episode], games: list[str]) -> list[Pool]:
    """Per enabled game: its split "extract" episodes; all of its episodes when there are none."""
    if not episodes:
        raise UserError("trajectories.jsonl holds no episode; run `oel collect` (or import trajectories) first")
    return [game_pool(episodes, game) for game in games]


def game_pool(episodes: list[Episode], game: str) -> Pool:
    mine = [ep for ep in episodes if ep.game == game and ep.split != "heldout"]  # held-out logs: eval only
    if not mine:
        raise UserError(f"trajectories.jsonl holds no episode of game {game!r}, which params enable; run "
                        f"`oel collect` again, or disable {game} under `games` (stores are per game)")
    chosen = [ep for ep in mine if ep.split == "extract"]
    if chosen:
        return Pool(game, chosen, "extract")
    log.warning("%s: no episode of split 'extract'; the extractor reads all %d %s episodes", game, len(mine), game)
    return Pool(game, mine, "all")


def new_stores(pools: list[Pool], params: Params, round_id: str) -> list[Store]:
    """K empty stores per game, each with what it will read (see the module docstring)."""
    stores, steps = [], params.extract.steps
    for pool in pools:
        shares = shares_trajectories(pool, params)
        for k in range(params.extract.stores):
            order = list(pool.episodes)
            if shares:
                random.Random(derive_seed(params.seed, round_id, "extract-order", pool.game, k)).shuffle(order)
            else:
                order = order[k * steps:(k + 1) * steps]  # a disjoint block: an independent run
            stores.append(Store(pool.game, k, order, shares))
    return stores


def shares_trajectories(pool: Pool, params: Params) -> bool:
    """True when the pool is too small for every store to read its own `steps` fresh trajectories."""
    return len(pool.episodes) < params.extract.stores * params.extract.steps


def warn_shared(pools: list[Pool], params: Params) -> None:
    """One warning line naming every game whose stores share trajectories."""
    shared = [f"{pool.game} ({len(pool.episodes)} episodes)" for pool in pools if shares_trajectories(pool, params)]
    if shared:
        need = params.extract.stores * params.extract.steps
        log.warning("extract: stores share trajectories for %s: fewer than extract.stores x extract.steps = %d, "
                    "so each store cycles over the pool in its own seeded order; set "
                    "collect.extraction_episodes_per_game >= %d for independent runs", ", ".join(shared), need, need)


def extractor_backend(params: Params, paths: RoundPaths) -> Backend:
    """The round's policy (default) or the model named by extract.extractor, behind one backend."""
    from oel.rollout import build_backend

    if params.extract.extractor == "policy":
        from oel.stages._common import round_policy_spec

        return build_backend(params, round_policy_spec(params, paths), paths.root)
    return build_backend(params, params.extract.extractor, paths.root)


def budget_counter(backend: Backend, params: Params, paths: RoundPaths) -> TokenCounter:
    """The policy's token counter: the extractor's own when it is the policy, else the policy tokenizer."""
    if params.extract.extractor == "policy":
        return backend.count_tokens
    return policy_token_counter(params, paths.root)


def policy_token_counter(params: Params, root: Path) -> TokenCounter:
    """Token counts in the policy's tokenizer, without loading weights (rounds keep the base tokenizer)."""
    from transformers import AutoTokenizer

    from oel.models import ModelError, resolve_spec

    try:
        tok = AutoTokenizer.from_pretrained(resolve_spec(params.model.name, root), revision=params.model.revision,
                                            trust_remote_code=params.model.trust_remote_code)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"model {params.model.name!r}: its tokenizer (which counts the knowledge budget) "
                         f"could not be loaded: {first}") from None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


# ---- the two ways to fill stores ------------------------------------------------------------------

def fill_knowledge(stores: list[Store], backend: Backend, count: TokenCounter, params: Params,
                   round_id: str) -> None:
    """steps x (one batched generate over every store of every game, parse, append, budget)."""
    cfg = params.extract
    lines = line_renderer(cfg.source, cfg.prompt_version)
    # v4: the model continues an answer that already starts with the marker, so the response parses as an
    # item. v3 has no marker: prefill_marker is ignored.
    prefix = f"{MARKER} " if cfg.prefill_marker and cfg.prompt_version == "v4" else ""
    prefill = [Message(role="assistant", content=prefix)] if prefix else []
    for step in tqdm(range(cfg.steps), desc=f"extract@{round_id}", unit="step"):
        episodes = [store.episode_at(step) for store in stores]
        views = [study_text(ep, cfg.prompt_version) for ep in episodes]
        prompts = [extraction_prompt(store.text(lines) if cfg.with_previous else "", text,
                                     cfg.max_items_per_step, version) + prefill
                   for store, (text, version) in zip(stores, views, strict=True)]
        outputs = backend.generate(prompts, cfg.sampling, seed=derive_seed(params.seed, round_id, "extract", step))
        for store, episode, prompt, out in zip(stores, episodes, prompts, outputs, strict=True):
            before = len(store.history)
            absorb(store, step, episode, prefix + out.text, out.n_tokens, count, params)
            store.calls.append({"game": store.game, "store": store.k, "step": step, "episode_id": episode.episode_id,
                                "seed": episode.seed, "policy": extractor_name(params, round_id), "prompt": prompt,
                                "response": prefix + out.text, "tokens": out.n_tokens,
                                "items": len(store.history) - before})
        tracking.log_metrics({"items_total": sum(len(s.history) for s in stores),
                              "store_tokens_mean": _mean(s.summary()["store_tokens"] for s in stores)}, step=step)


def study_text(episode: Episode, version: str) -> tuple[str, str]:
    """(text, template version) the extractor reads an episode with: a conversation with a simulated user
    (games.users.CONVERSATIONS) as a conversation, with the chat-log prompt; anything else as before."""
    if (render := CONVERSATIONS.get(episode.game)) is not None:
        return render(episode), "chat"
    return render_transcript(episode), template_version(episode, version)


def extractor_name(params: Params, round_id: str) -> str:
    """The policy that wrote the knowledge: the round's start policy, or the model extract.extractor names."""
    return params.policy_of(round_id) if params.extract.extractor == "policy" else params.extract.extractor


def parse_response(response: str, count: TokenCounter, params: Params) -> ParseResult:
    """v4: marked items (at most max_items_per_step); v3: one item per non-empty line."""
    cfg = params.extract
    if cfg.prompt_version == "v3":
        return parse_lines(response, cfg.max_item_tokens, count)
    return parse_items(response, cfg.max_items_per_step, cfg.max_item_tokens, count)


def absorb(store: Store, step: int, episode: Episode, response: str, n_tokens: int, count: TokenCounter,
           params: Params) -> None:
    """Parse one response into the store; count what was rejected."""
    cfg = params.extract
    parsed = parse_response(response, count, params)
    lines = line_renderer(cfg.source, cfg.prompt_version)
    store.responses += 1
    store.raw_responses.append(response)
    store.generated_tokens += n_tokens
    store.empty_responses += parsed.empty
    store.dropped_parse += parsed.dropped_junk + parsed.dropped_extra
    store.cut_items += parsed.cut
    new = [KnowledgeItem(game=store.game, store=store.k, step=step, source_episode=episode.episode_id, text=text,
                         tokens=count(lines(text))) for text in parsed.items]
    store.append(new, cfg.max_knowledge_tokens)


def fill_raw(stores: list[Store], params: Params, count: TokenCounter) -> None:
    """Raw ablation: each step appends the trajectory's transcript itself (no model), same budget.

    A transcript longer than the whole budget loses its later rounds, never its summary; if even the
    summary does not fit, the FIFO drops it like any oversized item.
    """
    cfg = params.extract
    for step in tqdm(range(cfg.steps), desc="extract (raw)", unit="step"):
        for store in stores:
            episode = store.episode_at(step)
            text = fit_transcript(episode, cfg.max_knowledge_tokens, lambda t: count(render_raw(t)))
            item = KnowledgeItem(game=store.game, store=store.k, step=step, source_episode=episode.episode_id,
                                 text=text, tokens=count(render_raw(text)))
            store.append([item], cfg.max_knowledge_tokens)


def fill_file(stores: list[Store], params: Params, root: Path, count: TokenCounter) -> None:
    """Knowledge given by a file: its items, in order, at step 0 of every store (games or imported logs)."""
    cfg = params.extract
    path = Path(root) / str(cfg.knowledge_file)
    texts = knowledge_file_items(path)
    items = [(text, count(render_line(text))) for text in texts]
    for text, tokens in items:
        if tokens > cfg.max_item_tokens:
            raise UserError(f"{path}: item {text[:60]!r} costs {tokens} tokens, over extract.max_item_tokens="
                            f"{cfg.max_item_tokens}; shorten it or raise max_item_tokens")
    total = sum(tokens for _, tokens in items)
    if total > cfg.max_knowledge_tokens:
        raise UserError(f"{path}: its {len(items)} items cost {total} tokens, over extract.max_knowledge_tokens="
                        f"{cfg.max_knowledge_tokens}; shorten the file or raise max_knowledge_tokens")
    for store in stores:
        store.append([KnowledgeItem(game=store.game, store=store.k, step=0, source_episode=f"file:{path.name}",
                                    text=text, tokens=tokens) for text, tokens in items], cfg.max_knowledge_tokens)


def knowledge_file_items(path: Path) -> list[str]:
    """One item per non-empty line; `#` lines are comments; a leading "-", "*" or item marker is dropped."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such knowledge file; fix extract.knowledge_file in params.yaml") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the knowledge file as UTF-8 text ({type(err).__name__}); "
                        "fix it or point extract.knowledge_file at another file") from None
    items = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix(MARKER) if line.startswith(MARKER) else line.lstrip("-*• ")
        text = normalize_space(neutralize(line))
        if text:
            items.append(text)
    if not items:
        raise UserError(f"{path}: the knowledge file holds no item; write one item per line")
    return items


# ---- outputs --------------------------------------------------------------------------------------

def summarize(stores: list[Store], params: Params, pools: list[Pool]) -> dict[str, Any]:
    """Totals over every store, then per game (pool, sharing, counters) and per store (stores.<game>.<k>)."""
    per_store = {pool.game: {str(s.k): s.summary() for s in stores if s.game == pool.game} for pool in pools}
    per_game = {pool.game: {"pool_split": pool.split, "pool_episodes": len(pool.episodes),
                            "stores_share_trajectories": shares_trajectories(pool, params),
                            **_totals(per_store[pool.game].values()),
                            "empty_stores": sum(not s.live() for s in stores if s.game == pool.game)}
                for pool in pools}
    splits = {pool.split for pool in pools}
    return {"source": params.extract.source, "extractor": params.extract.extractor,
            "prompt_version": params.extract.prompt_version,
            "pool_split": splits.pop() if len(splits) == 1 else "mixed",
            "pool_episodes": sum(len(pool.episodes) for pool in pools), "steps": params.extract.steps,
            "stores_share_trajectories": any(g["stores_share_trajectories"] for g in per_game.values()),
            **_totals(s.summary() for s in stores), "empty_stores": sum(not store.live() for store in stores),
            "games": per_game, "stores": per_store}


def _totals(blocks) -> dict[str, int]:
    blocks = list(blocks)
    return {key: sum(b[key] for b in blocks) for key in blocks[0]} if blocks else {}


def hostile_events(episodes: list[Episode], stores: list[Store]) -> dict[str, int]:
    """Hostile text this stage met, in its input trajectories and the extractor's output."""
    return count_hostile([*(text for ep in episodes for turn in ep.turns for text in (turn.response, turn.observation)),
                          *(response for store in stores for response in store.raw_responses)],
                         SLOT_LIMITS["transcript"])


def log_stores(stores: list[Store], params: Params) -> None:
    """The live stores as markdown and the newest items per store, as MLflow artifacts of this run."""
    lines = line_renderer(params.extract.source, params.extract.prompt_version)
    with tempfile.TemporaryDirectory() as tmp:
        for store in stores:
            md = Path(tmp) / store.game / f"store-{store.k}.md"
            write_text(md, store.text(lines))
            tracking.log_artifact(md, f"knowledge/{store.game}")
        sample = Path(tmp) / "items-sample.jsonl"
        write_jsonl(sample, [item for store in stores for item in store.history[-SAMPLE_ITEMS:]])
        tracking.log_artifact(sample, "knowledge")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0

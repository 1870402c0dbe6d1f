"""extract: the model writes experiential knowledge from its own trajectories into K stores.

Per store k and step t, the extractor reads ONE trajectory (as a "Round{k}_Input/Output" transcript
with the final feedback) plus the store so far (`extract.with_previous`), and writes 1-2 items that
start with "- EXPERIENCE ITEM:". Items are appended; the store is cut to `max_knowledge_tokens` by
dropping the oldest whole items (the paper's FIFO). The K stores run in parallel: one batched
generate call per step holds the K prompts.

Which trajectories: episodes of split "extract" (the collect stage plays them for the extractor).
When there are none (e.g. imported logs only), every episode in trajectories.jsonl is used and the
summary says `pool_split: all`. Each store reads the pool in its own seeded order (cycling when
`steps` exceeds the pool): the stores differ by trajectories as well as by sampling, like the paper's
runs that each play their own games.

Sampling seeds: one generate call per step gets the seed derived from (seed, round, step); within
the batch every row draws its own tokens, so the K stores are independent samples. Store k's output
therefore depends on the batch it ran in, not on k alone (the backend takes one seed per call).

Token costs (the budget) are counted with the POLICY's tokenizer even when `extract.extractor` names
another model: the store is what the policy-as-teacher reads.

Modes:
  source: knowledge, extractor: policy   the paper's on-policy default
  source: knowledge, extractor: <spec>   another model writes the knowledge (off-policy source ablation)
  source: raw                            no model: each trajectory's transcript is one "item" (raw ablation)

Writes data/<r>/knowledge/items.jsonl (every item ever written, in order, each with store/step/source
episode and `tokens` = its cost in the store) and extract_summary.json.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from oel import tracking
from oel.artifacts import read_jsonl, write_json, write_jsonl, write_text
from oel.config import Params
from oel.errors import UserError
from oel.knowledge import MARKER, newest_within_budget, parse_items, render_line, render_raw, store_text
from oel.paths import RoundPaths
from oel.prompts.render import SLOT_LIMITS, count_hostile
from oel.rollout.backend import Backend, derive_seed
from oel.schemas import Episode, KnowledgeItem, Message
from oel.transcripts import extraction_prompt, fit_transcript, render_transcript

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]
SAMPLE_ITEMS = 20  # items logged to MLflow per store


@dataclass
class Store:
    """One store's history and live window, plus the counters of its summary."""

    k: int
    order: list[Episode]
    history: list[KnowledgeItem] = field(default_factory=list)
    start: int = 0                 # history[start:] is the live (budgeted) store; FIFO, never moves back
    responses: int = 0
    empty_responses: int = 0
    dropped_parse: int = 0
    cut_items: int = 0
    generated_tokens: int = 0
    raw_responses: list[str] = field(default_factory=list)  # extractor output as generated (hostile counts)

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
    """Read trajectories, fill K stores, write items.jsonl + extract_summary.json, log to MLflow."""
    episodes, pool_split = extraction_pool(read_jsonl(paths.trajectories, Episode))
    stores = new_stores(episodes, params, paths.round_id)
    if params.extract.source == "raw":
        fill_raw(stores, params, policy_token_counter(params, paths.root))
    else:
        backend = backend or extractor_backend(params, paths)
        fill_knowledge(stores, backend, budget_counter(backend, params, paths), params, paths.round_id)
    write_jsonl(paths.items, [item for store in stores for item in store.history])
    summary = summarize(stores, params, pool_split, len(episodes))
    # Reliability (issue 9): hostile text this stage met, in its input trajectories and the extractor's output.
    summary["hostile_events"] = count_hostile([*(text for ep in episodes for turn in ep.turns
                                                for text in (turn.response, turn.observation)),
                                              *(response for store in stores for response in store.raw_responses)],
                                             SLOT_LIMITS["transcript"])
    write_json(paths.extract_summary, summary)
    log_stores(stores, params)
    return summary


# ---- inputs ---------------------------------------------------------------------------------------

def extraction_pool(episodes: list[Episode]) -> tuple[list[Episode], str]:
    """Split "extract" episodes; all episodes when there are none (documented fallback)."""
    if not episodes:
        raise UserError("trajectories.jsonl holds no episode; run `oel collect` (or import trajectories) first")
    chosen = [ep for ep in episodes if ep.split == "extract"]
    if chosen:
        return chosen, "extract"
    log.warning("no episode of split 'extract'; the extractor reads all %d episodes", len(episodes))
    return episodes, "all"


def new_stores(episodes: list[Episode], params: Params, round_id: str) -> list[Store]:
    """K empty stores, each with its own seeded reading order over the pool."""
    stores = []
    for k in range(params.extract.stores):
        order = list(episodes)
        random.Random(derive_seed(params.seed, round_id, "extract-order", k)).shuffle(order)
        stores.append(Store(k, order))
    return stores


def extractor_backend(params: Params, paths: RoundPaths) -> Backend:
    """The round's policy (default) or the model named by extract.extractor, behind one backend."""
    from oel.rollout import TransformersBackend

    if params.extract.extractor == "policy":
        from oel.stages._common import load_round_policy

        loaded = load_round_policy(params, paths)
    else:
        from oel.models import load_model

        loaded = load_model(params.extract.extractor, params.model, paths.root)
    return TransformersBackend(loaded, thinking=params.model.thinking)


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
    """steps x (one batched generate over the K stores, parse, append, budget)."""
    cfg = params.extract
    # The model continues an answer that already starts with the marker, so the response parses as an item.
    prefix = f"{MARKER} " if cfg.prefill_marker else ""
    prefill = [Message(role="assistant", content=prefix)] if prefix else []
    for step in tqdm(range(cfg.steps), desc=f"extract@{round_id}", unit="step"):
        episodes = [store.episode_at(step) for store in stores]
        prompts = [extraction_prompt(store.text() if cfg.with_previous else "", render_transcript(ep),
                                     cfg.max_items_per_step) + prefill for store, ep in zip(stores, episodes, strict=True)]
        outputs = backend.generate(prompts, cfg.sampling, seed=derive_seed(params.seed, round_id, "extract", step))
        for store, episode, out in zip(stores, episodes, outputs, strict=True):
            absorb(store, step, episode, prefix + out.text, out.n_tokens, count, params)
        tracking.log_metrics({"items_total": sum(len(s.history) for s in stores),
                              "store_tokens_mean": _mean(s.summary()["store_tokens"] for s in stores)}, step=step)


def absorb(store: Store, step: int, episode: Episode, response: str, n_tokens: int, count: TokenCounter,
           params: Params) -> None:
    """Parse one response into the store; count what was rejected."""
    cfg = params.extract
    parsed = parse_items(response, cfg.max_items_per_step, cfg.max_item_tokens, count)
    store.responses += 1
    store.raw_responses.append(response)
    store.generated_tokens += n_tokens
    store.empty_responses += parsed.empty
    store.dropped_parse += parsed.dropped_junk + parsed.dropped_extra
    store.cut_items += parsed.cut
    new = [KnowledgeItem(store=store.k, step=step, source_episode=episode.episode_id, text=text,
                         tokens=count(render_line(text))) for text in parsed.items]
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
            item = KnowledgeItem(store=store.k, step=step, source_episode=episode.episode_id, text=text,
                                 tokens=count(render_raw(text)))
            store.append([item], cfg.max_knowledge_tokens)


# ---- outputs --------------------------------------------------------------------------------------

def summarize(stores: list[Store], params: Params, pool_split: str, pool_size: int) -> dict[str, Any]:
    per_store = {str(store.k): store.summary() for store in stores}
    totals = {key: sum(s[key] for s in per_store.values()) for key in next(iter(per_store.values()))}
    return {"source": params.extract.source, "extractor": params.extract.extractor, "pool_split": pool_split,
            "pool_episodes": pool_size, "steps": params.extract.steps, **totals,
            "empty_stores": sum(not store.live() for store in stores), "stores": per_store}


def log_stores(stores: list[Store], params: Params) -> None:
    """The live stores as markdown and the newest items per store, as MLflow artifacts of this run."""
    lines = render_raw if params.extract.source == "raw" else render_line
    with tempfile.TemporaryDirectory() as tmp:
        for store in stores:
            md = Path(tmp) / f"store-{store.k}.md"
            write_text(md, store.text(lines))
            tracking.log_artifact(md, "knowledge")
        sample = Path(tmp) / "items-sample.jsonl"
        write_jsonl(sample, [item for store in stores for item in store.history[-SAMPLE_ITEMS:]])
        tracking.log_artifact(sample, "knowledge")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0

"""headroom: before training, does this round's knowledge make its start policy better at all?

Plays the round's own user-side seeds (the first `headroom.episodes_per_game` per game; held-out seeds are
never touched) with the round's start policy, once without knowledge, once with each of the game's stores and,
when `headroom.placebo` is set, once with that text in the knowledge slot, all at the same sampling seed, and
compares them per game and store with the paired tests of oel.headroom.
Writes data/<r>/headroom/episodes.jsonl and, last, reports/<r>/headroom.json; distill reads the verdict and,
with distill.require_headroom, trains only when there is headroom.
"""

from __future__ import annotations

import logging
from typing import Any

from oel import tracking
from oel.artifacts import write_json, write_jsonl
from oel.config import Params
from oel.errors import UserError
from oel.headroom import verdict
from oel.paths import RoundPaths
from oel.rollout import build_backend, release
from oel.schemas import Episode
from oel.stages._common import round_policy_spec

log = logging.getLogger(__name__)


def run(params: Params, paths: RoundPaths) -> dict[str, Any]:
    """Play plain and with knowledge on the round's own seeds, write the episodes, then the verdict."""
    start = params.policy_of(paths.round_id)
    knowledge = stores_of(params, paths)
    if knowledge is None:
        return _unmeasured(params, paths, start)
    cfg = params.headroom
    backend = build_backend(params, round_policy_spec(params, paths), paths.root)
    plain = play(backend, params, paths, start, None)
    teacher = play(backend, params, paths, start, knowledge)
    placebo = play(backend, params, paths, start, {g: [(None, cfg.placebo)] for g in knowledge}) if cfg.placebo else []
    release(backend)
    result = verdict(paths.round_id, start, plain, teacher, cfg.alpha, cfg.bootstrap_resamples, params.seed,
                     cfg.episodes_per_game, placebo)
    write_jsonl(paths.headroom_episodes, plain + teacher + placebo)
    write_json(paths.headroom, result.model_dump(mode="json"))  # last: distill reads it
    tracking.log_to_iteration(params, paths.round_id, {"headroom_found": float(result.headroom)})
    (log.info if result.headroom else log.warning)("headroom@%s: %s", paths.round_id, result.reason)
    return {"headroom": result.headroom, "better": len(result.better),
            "episodes": len(plain) + len(teacher) + len(placebo)}


def stores_of(params: Params, paths: RoundPaths) -> dict[str, list[tuple[int, str]]] | None:
    """Each enabled game's first `headroom.stores` stores (0: all), as (k, text); None for a round on chat logs
    (its stores are of conversations: there is no game to play)."""
    from oel.artifacts import read_store
    from oel.chatlog import CHAT_GAME

    files = paths.store_files()
    if set(files) == {CHAT_GAME}:  # a round on chat logs: its "game" is conversations, nothing to play
        return None
    missing = [g for g in params.games.enabled() if g not in files]
    if missing:
        raise UserError(f"{paths.stores}: no store-<k>.md for {', '.join(missing)}; run "
                        f"`oel consolidate --round {paths.round_id}` first")
    keep = params.headroom.stores or None
    return {game: [(k, read_store(path)) for k, path in files[game][:keep]] for game in params.games.enabled()}


def _unmeasured(params: Params, paths: RoundPaths, start: str) -> dict[str, Any]:
    reason = "not measured: a round on chat logs has no game to play; distill trains"
    result = verdict(paths.round_id, start, [], [], params.headroom.alpha, params.headroom.bootstrap_resamples,
                     params.seed, 0).model_copy(update={"reason": reason})
    write_jsonl(paths.headroom_episodes, [])
    write_json(paths.headroom, result.model_dump(mode="json"))
    log.info("headroom@%s: %s", paths.round_id, reason)
    return {"headroom": True, "better": 0, "episodes": 0}


def play(backend, params: Params, paths: RoundPaths, start: str,
         knowledge: dict[str, list[tuple[int | None, str]]] | None) -> list[Episode]:
    """Every game's headroom seeds in one batched call: once plain, or once per store of that game, or (a store
    numbered None) once with the placebo paragraph, recorded with no store and an id ending in -placebo."""
    from oel.games import make_game
    from oel.rollout import EpisodeSpec
    from oel.rollout import play as play_specs
    from oel.seeds import episode_seeds

    specs = []
    for game in params.games.enabled():
        variants = [(None, None)] if knowledge is None else knowledge[game]
        for seed in episode_seeds(params.seed, game, "user", paths.round_id, params.headroom.episodes_per_game):
            for k, text in variants:
                suffix = "" if text is None else "-placebo" if k is None else f"-k{k}"
                specs.append(EpisodeSpec(game, seed, "user", f"{paths.round_id}-headroom-{game}-{seed}{suffix}",
                                         knowledge=text, knowledge_store=k))
    return play_specs(specs, lambda game: make_game(game, params.games, paths.root), backend,
                      params.headroom.sampling, round_id=paths.round_id, policy=start,
                      batch_size=params.headroom.batch_size, seed=params.seed)

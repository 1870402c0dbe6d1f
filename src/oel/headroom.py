"""Headroom before training: does the teacher beat its own start policy? Pure: episodes in, a verdict out.

Distillation moves what the teacher (the round-start policy WITH the round's knowledge in context) does better
than the student (the same policy without it) into the weights. Where the teacher is no better on any headline
metric, there is nothing to transfer, and training only adds noise: an independent re-run of OEL (ReSAIL)
saw rounds get worse exactly there. So the headroom stage plays the round's own user-side seeds (never the
held-out ones) once without knowledge and once per store, and distill trains only when some store's teacher is
better than the plain start policy, beyond noise, on some game's pass rate, invalid-action rate or tokens per
turn (the paired tests of oel.paired, one-sided at `promotion.alpha` split over the stores: Bonferroni).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from oel.metrics import invalid_by_game as _invalid
from oel.metrics import tokens_by_game as _tokens
from oel.paired import Paired, ratio, successes
from oel.schemas import Episode, HeadroomVerdict


def verdict(round_id: str, start: str, plain: Iterable[Episode], teacher: Iterable[Episode], alpha: float,
            resamples: int, seed: int, episodes_per_game: int) -> HeadroomVerdict:
    """Per game and store, the teacher against the plain start policy on the same seeds (teacher better =
    the plain policy worse: the paired tests' 'worse' side is the plain policy's)."""
    plain_by = _by_game_seed(plain)
    teacher_by: dict[tuple[str, int], dict[int, Episode]] = defaultdict(dict)
    for ep in teacher:
        teacher_by[(ep.game, ep.knowledge_store)][ep.seed] = ep
    stores = defaultdict(int)
    for game, _ in teacher_by:
        stores[game] += 1
    checks: dict[str, Paired] = {}
    for (game, k), eps in sorted(teacher_by.items()):
        level = alpha / max(stores[game], 1)
        seeds = sorted(set(eps) & set(plain_by.get(game, {})))
        a, b = [plain_by[game][s] for s in seeds], [eps[s] for s in seeds]
        key = f"{game} store {k}"
        checks[f"{key} pass_rate"] = successes([e.success for e in a], [e.success for e in b], 0.0, level)
        boot = {"resamples": resamples, "seed": seed}
        checks[f"{key} invalid_action_rate"] = ratio(_invalid(a), _invalid(b), 0.0, level, relative=False, **boot)
        checks[f"{key} tokens_per_turn"] = ratio(_tokens(a), _tokens(b), 0.0, level, relative=True, **boot)
    better = [key for key, c in checks.items() if c.blocked]
    if not checks:
        found, reason = True, "no game was played with knowledge (no stores): nothing to measure, trains"
    elif better:
        found, reason = True, "the teacher is better beyond noise on " + ", ".join(better)
    else:
        found = False
        reason = (f"no headroom: the teacher ({start} + this round's knowledge) beat {start} without it on no "
                  f"headline metric beyond noise ({_summary(checks)})")
    return HeadroomVerdict(round=round_id, start_policy=start, headroom=found, reason=reason,
                           episodes_per_game=episodes_per_game, stores=dict(stores),
                           checks={k: c.as_dict() for k, c in checks.items()}, better=better)


def _summary(checks: dict[str, Paired]) -> str:
    parts = []
    for key, c in checks.items():
        fmt = (lambda x: f"{x:.1f}") if key.endswith("tokens_per_turn") else (lambda x: f"{100 * x:.1f}%")
        parts.append(f"{key} {fmt(c.champion)} with vs {fmt(c.candidate)} without")
    return "; ".join(parts)


def _by_game_seed(episodes: Iterable[Episode]) -> dict[str, dict[int, Episode]]:
    out: dict[str, dict[int, Episode]] = defaultdict(dict)
    for ep in episodes:
        out[ep.game][ep.seed] = ep
    return out



"""Headroom before training: does the teacher beat its own start policy? Pure: episodes in, a verdict out.

Distillation moves what the teacher (the round-start policy WITH the round's knowledge in context) does better
than the student (the same policy without it) into the weights. Where the teacher is no better on any headline
metric, there is nothing to transfer, and training only adds noise: an independent re-run of OEL (ReSAIL)
saw rounds get worse exactly there. So the headroom stage plays the round's own user-side seeds (never the
held-out ones) once without knowledge and once per store, and distill trains only when some store's teacher is
better than the plain start policy, beyond noise, on some game's pass rate, invalid-action rate or tokens per
turn (the paired tests of oel.paired, one-sided at `promotion.alpha` split over the stores: Bonferroni).

Any paragraph in the knowledge slot can move a small model: a 0.5B teacher passed 44.8% of its users with its
store and 38.5% with "Be friendly and helpful." (reports/cpu-proof.md 4b), against 22.9% without either, and
distilling that teaches nothing about the game. With `headroom.placebo` set, the start policy also plays with
that paragraph in the slot, and a store counts only on a metric where it is better than both the plain policy
and the placebo beyond noise (an intersection-union test: each at the same level, no further split).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from oel.metrics import invalid_by_game as _invalid
from oel.metrics import tokens_by_game as _tokens
from oel.paired import Paired, ratio, successes
from oel.schemas import Episode, HeadroomVerdict

VS_PLACEBO = " vs placebo"


def verdict(round_id: str, start: str, plain: Iterable[Episode], teacher: Iterable[Episode], alpha: float,
            resamples: int, seed: int, episodes_per_game: int, placebo: Iterable[Episode] = ()) -> HeadroomVerdict:
    """Per game and store, the teacher against the plain start policy on the same seeds (teacher better =
    the plain policy worse: the paired tests' 'worse' side is the plain policy's), and against the placebo
    level when there is one (checks named '... vs placebo')."""
    plain_by, placebo_by = _by_game_seed(plain), _by_game_seed(placebo)
    teacher_by: dict[tuple[str, int], dict[int, Episode]] = defaultdict(dict)
    for ep in teacher:
        teacher_by[(ep.game, ep.knowledge_store)][ep.seed] = ep
    stores = defaultdict(int)
    for game, _ in teacher_by:
        stores[game] += 1
    checks: dict[str, Paired] = {}
    boot = {"resamples": resamples, "seed": seed}
    for (game, k), eps in sorted(teacher_by.items()):
        level = alpha / max(stores[game], 1)
        checks |= _compare(f"{game} store {k}", plain_by.get(game, {}), eps, level, boot)
        if placebo_by:
            checks |= _compare(f"{game} store {k}", placebo_by.get(game, {}), eps, level, boot, VS_PLACEBO)
    beats_plain = [key for key, c in checks.items() if c.blocked and not key.endswith(VS_PLACEBO)]
    better = [key for key in beats_plain if not placebo_by or checks[key + VS_PLACEBO].blocked]
    if not checks:
        found, reason = True, "no game was played with knowledge (no stores): nothing to measure, trains"
    elif better:
        found, reason = True, "the teacher is better beyond noise on " + ", ".join(better)
    elif beats_plain:
        found = False
        reason = (f"no headroom beyond a placebo: the teacher beat {start} without knowledge on "
                  f"{', '.join(beats_plain)}, but not {start} with the placebo paragraph ({_summary(checks)})")
    else:
        found = False
        reason = (f"no headroom: the teacher ({start} + this round's knowledge) beat {start} without it on no "
                  f"headline metric beyond noise ({_summary(checks)})")
    return HeadroomVerdict(round=round_id, start_policy=start, headroom=found, reason=reason,
                           episodes_per_game=episodes_per_game, stores=dict(stores),
                           checks={k: c.as_dict() for k, c in checks.items()}, better=better)


def _compare(key: str, other: dict[int, Episode], teacher: dict[int, Episode], level: float, boot: dict,
             suffix: str = "") -> dict[str, Paired]:
    """The teacher against `other` (plain or placebo) on their common seeds, on each headline metric."""
    seeds = sorted(set(teacher) & set(other))
    a, b = [other[s] for s in seeds], [teacher[s] for s in seeds]
    return {f"{key} pass_rate{suffix}": successes([e.success for e in a], [e.success for e in b], 0.0, level),
            f"{key} invalid_action_rate{suffix}": ratio(_invalid(a), _invalid(b), 0.0, level, relative=False, **boot),
            f"{key} tokens_per_turn{suffix}": ratio(_tokens(a), _tokens(b), 0.0, level, relative=True, **boot)}


def _summary(checks: dict[str, Paired]) -> str:
    parts = []
    for key, c in checks.items():
        fmt = (lambda x: f"{x:.1f}") if "tokens_per_turn" in key else (lambda x: f"{100 * x:.1f}%")
        other = "the placebo" if key.endswith(VS_PLACEBO) else "without"
        parts.append(f"{key} {fmt(c.champion)} with vs {fmt(c.candidate)} {other}")
    return "; ".join(parts)


def _by_game_seed(episodes: Iterable[Episode]) -> dict[str, dict[int, Episode]]:
    out: dict[str, dict[int, Episode]] = defaultdict(dict)
    for ep in episodes:
        out[ep.game][ep.seed] = ep
    return out



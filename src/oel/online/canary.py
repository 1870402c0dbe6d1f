"""`oel canary`: end a running canary on what its users said, the gate for what is served.

After a promotion with serve.canary > 0, the gateway sends that share of requests to the new champion and the rest
to the previous one. Each answer is a trace that names the version that gave it (the response's `model`), and a
user's rating of it is its `user_feedback` assessment. The canary is judged on the answers both versions gave
since the routes last changed, rated by their users: once each version has serve.canary_min_ratings rated answers,

    rolled back  the new champion's share of good ratings (above 0) is lower than the previous one's by more than
                 serve.canary_margin, with one-sided Fisher exact p < promotion.alpha (oel.paired.proportions,
                 the gate's test for two rates with no unit in common);
    kept         otherwise: every request goes to the new champion.

Either way the verdict is an event on the champion's decision file, mirrored to the registry; a rollback routes
every request back at once. This matters most for a round on traffic: the gate has no held-out games to play it
on, so the canary's users are the only ones who judge it before everyone is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oel import traces, tracking
from oel.config import Params
from oel.errors import UserError
from oel.online.engine import policy_of
from oel.online.stack import read_state
from oel.paired import Paired, proportions
from oel.rounds import lifecycle


class CanaryError(UserError, ValueError):
    """No canary to judge here; one line saying what runs and what to do."""


@dataclass(frozen=True)
class Rated:
    good: int
    rated: int
    answered: int

    def __str__(self) -> str:
        share = f" ({100 * self.good / self.rated:.1f}%)" if self.rated else ""
        return f"{self.good}/{self.rated} rated good{share} of {self.answered} answers"


@dataclass(frozen=True)
class Verdict:
    canary: str            # the new champion, served to the canary share
    incumbent: str         # the previous champion, served the rest
    ratings: dict[str, Rated]
    test: Paired | None    # None while either version has too few ratings
    outcome: str           # waiting | kept | rolled_back
    reason: str


def ratings(answers: list[traces.Answer], versions: tuple[str, ...]) -> dict[str, Rated]:
    """Per version: answers rated good, answers rated, answers given (each answer's latest rating counts)."""
    counts = {v: [0, 0, 0] for v in versions}
    for answer in answers:
        version = policy_of(answer.served)
        if version not in counts:
            continue  # another endpoint's model
        counts[version][2] += 1
        if answer.good is not None:
            counts[version][1] += 1
            counts[version][0] += answer.good
    return {v: Rated(*c) for v, c in counts.items()}


def judge(params: Params, canary: str, incumbent: str, rated: dict[str, Rated]) -> Verdict:
    """The canary's verdict from the two versions' ratings (pure: no store, no gateway)."""
    serve, need = params.serve, params.serve.canary_min_ratings
    mine, theirs = rated[canary], rated[incumbent]
    said = f"{canary} {mine}; {incumbent} {theirs}"
    short = [f"{v} {r.rated}" for v, r in ((canary, mine), (incumbent, theirs)) if r.rated < need]
    if short:
        return Verdict(canary, incumbent, rated, None, "waiting",
                       f"too few ratings to judge ({', '.join(short)} of the {need} each needs, "
                       f"serve.canary_min_ratings): {said}")
    test = proportions((mine.good, mine.rated), (theirs.good, theirs.rated), serve.canary_margin,
                       params.promotion.alpha)
    gap = f"{'worse' if test.worse_by > 0 else 'better'} by {100 * abs(test.worse_by):.1f} points"
    numbers = (f"{said}: {gap}, margin {100 * serve.canary_margin:.1f}, one-sided Fisher exact p = "
               f"{test.p_value:.3g}")
    if test.blocked:
        return Verdict(canary, incumbent, rated, test, "rolled_back", f"the canary's users rated it worse: {numbers}")
    return Verdict(canary, incumbent, rated, test, "kept", f"not worse beyond the margin: {numbers}")


def running_canary(params: Params, root: Path) -> tuple[str, str, int]:
    """(new champion, previous champion, when the routes last changed in ms) of the canary the gateway runs."""
    stack = read_state(root)
    if stack is None:
        raise CanaryError(f"no `oel serve` runs for {root}; a canary is judged while it is served")
    routes = {policy_of(n): share for n, share in tracking.gateway_routes(stack.gateway, stack.endpoint).items()
              if share > 0}
    champ = lifecycle.champion(params, root)
    others = [policy for policy in routes if policy != champ]
    if champ not in routes or not others:
        raise CanaryError(f"no canary runs: the gateway routes every request to {', '.join(routes) or 'nothing'}, "
                          f"the champion is {champ} (a promotion with serve.canary > 0 starts one)")
    if len(others) > 1:
        raise CanaryError(f"the gateway routes to {', '.join(routes)}: more than a canary and its incumbent; "
                          f"`oel route --full` first")
    return champ, others[0], int(stack.routed_at * 1000)


def decide(params: Params, root: Path) -> Verdict:
    """Judge the running canary on its users' ratings and act: record the verdict, and roll back if it failed.
    The caller mirrors the decision to the registry and routes the gateway (as after `oel rollback`)."""
    from time import time_ns

    canary, incumbent, since_ms = running_canary(params, root)
    with tracking.client(params) as client:
        answers = traces.read_answers(client, params.serve.experiment, since_ms, time_ns() // 1_000_000)
    verdict = judge(params, canary, incumbent, ratings(answers, (canary, incumbent)))
    if verdict.outcome == "rolled_back":
        lifecycle.rollback(params, root, verdict.reason, by_canary=True)
    elif verdict.outcome == "kept":
        lifecycle.canary_kept(params, root, verdict.reason)
    return verdict

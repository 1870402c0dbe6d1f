"""Which policies the gateway endpoint routes to, and each one's share of requests: pure functions.

The champion is read from the decision files (oel.rounds.lifecycle); what the endpoint routes to now is read from
the gateway. Only the champion and what is served now can be routed to, so a round the gate kept back (a
challenger) is never served. Shares are whole percents: the gateway splits by int(weight * 100).
"""

from __future__ import annotations

from collections.abc import Mapping


def plan(champion: str, current: Mapping[str, float], canary: float, full: bool = False) -> dict[str, float]:
    """policy -> share, after the decisions that made `champion` champion.

    full (a rollback, `oel route --full`, a fresh gateway): the champion alone. A champion already routed keeps
    its routes (a canary runs until `oel route --full`). A new champion gets the `canary` share, the policy
    that serves most requests now the rest; with canary 0 it takes every request at once."""
    serving = {policy: share for policy, share in current.items() if share > 0}
    if full or not serving or canary == 0:
        return {champion: 1.0}
    if champion in serving:
        return dict(serving)
    incumbent = max(serving, key=lambda policy: (serving[policy], policy))
    return {champion: canary, incumbent: round(1.0 - canary, 2)}


def retired(loaded: list[str], before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    """Loaded policies that neither route now nor routed just before: the one just replaced stays loaded, so a
    rollback needs no load and requests already sent to it finish."""
    keep = set(before) | set(after)
    return [policy for policy in loaded if policy not in keep]


def describe(routes: Mapping[str, float], name_of=str) -> str:
    """`oel-r2 90%, oel-r3 10%`, largest share first."""
    ordered = sorted(routes.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{name_of(policy)} {round(100 * share)}%" for policy, share in ordered)

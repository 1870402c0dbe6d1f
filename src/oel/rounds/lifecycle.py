"""Who is champion, from the decision files alone: the gate's decisions, force-promotions and rollbacks.

Every decision is reports/<r>/promotion.json (oel.rounds.records.Decision). The champion is read by folding
the decisions in declaration order (each names the champion after it), so planning the next round, `oel rounds`
and the report need no tracking server; oel.rounds.registry mirrors the result into MLflow's aliases, and the
flow and the CLI call it (this module writes files only).

  promote   the gate decides an evaluated round (oel.rounds.gate) and the decision is written
  force     a person promotes a round the gate kept back: the decision keeps the gate's checks, becomes
            `champion`, and records the person's reason as an event
  rollback  the champion goes back to the one before it: the current champion round's decision becomes
            `rolled_back` (its checks and earlier events kept), with the reason as an event
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from oel.config import ALIASES, Params
from oel.paths import ProjectPaths
from oel.rounds.gate import PromotionError, decide
from oel.rounds.ids import next_round_id
from oel.rounds.records import (
    CHALLENGER,
    CHAMPION,
    ROLLED_BACK,
    Decision,
    Event,
    read_decision,
    write_decision,
)

log = logging.getLogger(__name__)

BASE = "base"


def decisions(params: Params, root: str | Path) -> dict[str, Decision]:
    """Every declared round's decision on disk, in declaration order (undecided rounds are absent)."""
    project = ProjectPaths(Path(root))
    return {r: read_decision(project.round(r).promotion) for r in params.rounds
            if project.round(r).promotion.is_file()}


def champion(params: Params, root: str | Path, before: str | None = None) -> str:
    """The champion after every decision (or after those of the rounds declared before `before`)."""
    current = BASE
    for r, record in decisions(params, root).items():
        if r == before:
            break
        current = record.champion_after
    return current


def challenger(params: Params, root: str | Path) -> str | None:
    """The latest round the gate kept back, if any."""
    kept = [r for r, record in decisions(params, root).items() if record.decision == CHALLENGER]
    return kept[-1] if kept else None


def aliases(params: Params, root: str | Path) -> dict[str, str]:
    """round -> its registry alias now (`champion`, `challenger`); other rounds have none."""
    out = {}
    if (kept := challenger(params, root)) is not None:
        out[kept] = CHALLENGER
    if (best := champion(params, root)) != BASE:
        out[best] = CHAMPION
    return out


def is_decided(root: str | Path, round_id: str) -> bool:
    """Gated on its current eval: a decision older than eval.json (eval rerun by `dvc repro`) is stale."""
    rp = ProjectPaths(Path(root)).round(round_id)
    return rp.promotion.is_file() and (not rp.details.is_file()
                                       or rp.promotion.stat().st_mtime_ns >= rp.details.stat().st_mtime_ns)


def undecided(params: Params, root: str | Path) -> list[str]:
    """Declared rounds evaluated but not (or no longer) gated, in order (the flow gates them before planning)."""
    project = ProjectPaths(Path(root))
    return [r for r in params.rounds if project.round(r).details.is_file() and not is_decided(root, r)]


def next_parent(params: Params, root: str | Path) -> str:
    """The policy the next declared round starts from: the champion (gate) or the last trained round (always)."""
    declared = list(params.rounds)
    last = declared[-1]
    if not is_decided(root, last):
        if params.promotion.policy == "always":
            return last
        raise PromotionError(f"round {last} has no promotion decision on its current eval "
                             f"({ProjectPaths(Path(root)).round(last).promotion} is missing or older than eval.json); "
                             f"run `oel promote --round {last}` first (oel-iteration does it after eval)")
    return champion(params, root)


def check_name(name: str, params: Params) -> None:
    """One line for a `--from` that names neither an alias nor a declared round (nothing read or written)."""
    if name not in (*ALIASES, BASE, *params.rounds):
        raise PromotionError(f"--from {name!r} is neither an alias nor a declared round; use {', '.join(ALIASES)}, "
                             f"base or one of {', '.join(params.rounds)}")


def resolve(name: str, params: Params, root: str | Path) -> str:
    """A round id, `base`, or an alias (`champion`, `challenger`) -> the policy it names now."""
    check_name(name, params)
    if name == CHAMPION:
        return champion(params, root)
    if name == CHALLENGER:
        if (kept := challenger(params, root)) is None:
            raise PromotionError("no round is a challenger yet (the gate kept none back); pass champion, base or "
                                 f"one of {', '.join(params.rounds)}")
        return kept
    return name


def promote(params: Params, root: str | Path, round_id: str) -> Decision:
    """The gate on an evaluated round: decide against the champion before it and write the decision."""
    _check_round(params, round_id)
    record = decide(params, root, round_id, champion(params, root, before=round_id))
    previous = _existing(root, round_id)
    if previous is not None and previous.events:  # a re-gate keeps the people's earlier say on record
        record = record.model_copy(update={"events": previous.events})
    write_decision(ProjectPaths(Path(root)).round(round_id).promotion, record)
    log.info("promotion@%s: %s (%s)", round_id, record.decision, record.reason)
    return record


def force(params: Params, root: str | Path, round_id: str, reason: str) -> Decision:
    """Make a gated round champion against the gate's advice; the gate's checks stay on record."""
    _check_round(params, round_id)
    reason = _reason(reason)
    record = _existing(root, round_id)
    if record is None:
        raise PromotionError(f"round {round_id} has no gate decision yet; run `oel promote --round {round_id}` "
                             f"first (a forced promotion overrides the gate's decision, it does not replace it)")
    if not record.trained:
        raise PromotionError(f"round {round_id} was not trained ({record.reason}); its policy is its start policy, "
                             f"so there is nothing to promote")
    before = champion(params, root)
    if before == round_id:
        raise PromotionError(f"round {round_id} is already champion")
    event = Event(kind="force", at=_now(), reason=reason, champion_before=before, champion_after=round_id)
    record = record.model_copy(update={"decision": CHAMPION, "champion_after": round_id, "events": [
        *record.events, event], "reason": f"forced by a person: {reason} (the gate said: {record.reason})"})
    write_decision(ProjectPaths(Path(root)).round(round_id).promotion, record)
    _hand_over(params, root, round_id, before, round_id)
    log.warning("promotion@%s: forced to champion (%s)", round_id, reason)
    return record


def rollback(params: Params, root: str | Path, reason: str, by_canary: bool = False) -> Decision:
    """The champion alias returns to the champion before the current one; returns the rolled-back decision.
    by_canary: the canary's ratings decided it (oel.online.canary), not a person."""
    reason = _reason(reason)
    current = champion(params, root)
    if current == BASE:
        raise PromotionError("the champion is base (no round was promoted): there is nothing to roll back")
    record = _existing(root, current)
    previous = record.champion_before
    event = Event(kind="canary" if by_canary else "rollback", at=_now(), reason=reason, champion_before=current,
                  champion_after=previous)
    who = "its canary's ratings" if by_canary else "a person"
    record = record.model_copy(update={"decision": ROLLED_BACK, "champion_after": previous,
                                       "events": [*record.events, event],
                                       "reason": f"rolled back by {who}: {reason} (was: {record.reason})"})
    write_decision(ProjectPaths(Path(root)).round(current).promotion, record)
    _hand_over(params, root, current, current, previous)
    log.warning("rollback: champion %s -> %s (%s)", current, previous, reason)
    return record


def canary_kept(params: Params, root: str | Path, reason: str) -> Decision:
    """The canary's ratings keep the champion: recorded on its decision (the champion does not change)."""
    current = champion(params, root)
    record = _existing(root, current)
    if record is None:
        raise PromotionError(f"the champion is {current}: no promoted round's canary to record")
    event = Event(kind="canary", at=_now(), reason=_reason(reason), champion_before=current, champion_after=current)
    record = record.model_copy(update={"events": [*record.events, event]})
    write_decision(ProjectPaths(Path(root)).round(current).promotion, record)
    log.info("canary of %s: kept (%s)", current, reason)
    return record


def _hand_over(params: Params, root: str | Path, round_id: str, old: str, new: str) -> None:
    """Rounds decided after `round_id` while `old` was champion (kept back against it) now leave `new` champion:
    the fold over the decision files must end where the person's override put the champion. Their own
    decisions, and whom they were compared with (champion_before), stay as they were."""
    order = list(params.rounds)
    project = ProjectPaths(Path(root))
    for r, record in decisions(params, root).items():
        if order.index(r) > order.index(round_id) and record.champion_after == old:
            write_decision(project.round(r).promotion, record.model_copy(update={"champion_after": new}))


def _check_round(params: Params, round_id: str) -> None:
    if round_id == BASE or round_id not in params.rounds:
        raise PromotionError(f"round {round_id!r} is not a declared round; the gate decides r1, r2, ... "
                             f"(declared: {', '.join(params.rounds)})")


def _existing(root: str | Path, round_id: str) -> Decision | None:
    path = ProjectPaths(Path(root)).round(round_id).promotion
    return read_decision(path) if path.is_file() else None


def _reason(reason: str | None) -> str:
    text = " ".join((reason or "").split())
    if not text:
        raise PromotionError("say why with --reason TEXT: it is recorded in the decision file, the registry and "
                             "the report")
    return text[:2000]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def rounds_table(params: Params, root: str | Path) -> str:
    """`oel rounds`: one line per declared round, then every metric check of each decision (files only)."""
    from oel.rounds.gate import describe

    project, found, tags = ProjectPaths(Path(root)), decisions(params, root), aliases(params, root)
    rows = [("round", "from", "alias", "gate", "pass rate", "reason")]
    for r in params.rounds:
        record = found.get(r)
        state = record.decision if record else "evaluated, not gated" if project.round(r).details.is_file() \
            else "not evaluated"
        rows.append((r, params.policy_of(r), tags.get(r, "—"), state,
                     _pct(record.pass_rate) if record else "—", record.reason if record else "—"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
             for row in rows]
    for r, record in found.items():
        if record.checks:
            lines.append(f"\n{r} vs {record.champion_before} (paired on the same held-out games; alpha "
                         f"{record.alpha:g}):")
            lines += [f"  {'BLOCKS' if c.blocked else 'ok    '} {describe(c, record.champion_before)}"
                      for c in record.checks]
        lines += [f"  {e.at} {e.kind}: {e.champion_before} -> {e.champion_after} ({e.reason})" for e in record.events]
    return "\n".join(lines) + f"\nnext round: {next_round(params, root)}"


def next_round(params: Params, root: str | Path) -> str:
    """What the next iteration runs, in words: the declared round not evaluated yet, or the one it declares."""
    last = list(params.rounds)[-1]
    if not ProjectPaths(Path(root)).round(last).details.is_file():
        return f"{last}, from {params.policy_of(last)} (declared)"
    try:
        return f"{next_round_id(list(params.rounds))}, from {next_parent(params, root)}"
    except PromotionError as err:
        return f"? ({err})"

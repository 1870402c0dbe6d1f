"""The promotion gate (issue 15): never start the next round from a round that got worse.

An independent reproduction of OEL (ReSAIL) saw every setting end below its first round: each round started
from the previous one whatever its eval said. Here, once a round is evaluated, the gate compares it with the
current champion (round 0, `base`, until a round is promoted) on the same held-out seeds:

  promoted (alias `champion`)  when, for every game, its no-knowledge pass rate is not below the champion's by
                               more than the allowed drop, and its OOD probe is not flagged;
  kept back (`challenger`)     otherwise; the champion stays, and the next round is declared `from:` it.

Allowed drop: `promotion.margin` (a pass-rate difference), or by default `wilson`: the champion's rate minus
the lower end of its 95% Wilson interval, i.e. the drop the champion's own sampling noise explains. At 6
held-out games per game (the eval default), a champion at 3/6 (50%, Wilson 18.8-81.2%) tolerates 31.2 points: a
challenger at 1/6 is kept back, one at 2/6 is promoted; at 100 (the cpu profile's FrozenLake), 50/100
(40.4-59.6%) tolerates 9.6 points.
A champion that solved nothing tolerates no drop, and nothing is below 0: every round is promoted then.
`promotion.policy: always` promotes every round (the loop as it was before the gate).

Each decision is reports/<r>/promotion.json (files only: `oel report` and `oel rounds` read them, and planning
the next round needs no tracking server); oel.registry mirrors it into the MLflow registry's aliases.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from oel.artifacts import read_json, write_json
from oel.config import ALIASES, Params
from oel.errors import UserError
from oel.metrics import OVERALL
from oel.paths import ProjectPaths

log = logging.getLogger(__name__)

BASE = "base"
CHAMPION, CHALLENGER = ALIASES
EPS = 1e-9  # pass rates are ratios of small integers: compare with a hair of slack


class PromotionError(UserError, ValueError):
    """A gate that cannot decide (missing eval, unknown alias); the message names the fix."""


def allowed_drop(champion: dict[str, Any], margin: float | str) -> float:
    """How far below the champion's pass rate a challenger may fall and still be promoted."""
    if margin == "wilson":
        return max(champion["pass_rate"] - champion["pass_ci_low"], 0.0)
    return float(margin)


def decisions(params: Params, root: str | Path) -> dict[str, dict[str, Any]]:
    """Every declared round's decision on disk, in declaration order (undecided rounds are absent)."""
    project = ProjectPaths(Path(root))
    out = {}
    for r in params.rounds:
        path = project.round(r).promotion
        if path.is_file():
            out[r] = read_json(path)
    return out


def champion(params: Params, root: str | Path, before: str | None = None) -> str:
    """The champion after every decision (or after those of the rounds declared before `before`)."""
    current = BASE
    for r, record in decisions(params, root).items():
        if r == before:
            break
        current = record["champion_after"]
    return current


def challenger(params: Params, root: str | Path) -> str | None:
    """The latest round the gate kept back, if any."""
    kept = [r for r, record in decisions(params, root).items() if record["decision"] == CHALLENGER]
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
    """The policy the next declared round starts from: the champion (gate) or the last round (always)."""
    declared = list(params.rounds)
    if params.promotion.policy == "always":
        return declared[-1]
    last = declared[-1]
    if not is_decided(root, last):
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


def _eval_of(root: Path, round_id: str) -> dict[str, Any]:
    path = ProjectPaths(root).round(round_id).details
    if not path.is_file():
        raise PromotionError(f"{path}: missing; run `oel eval --round {round_id}` first (the gate compares evals)")
    metrics = read_json(path)
    held = metrics.get("heldout")
    if held is not None and (not isinstance(held, dict) or OVERALL not in held):
        raise PromotionError(f"{path}: a damaged `heldout` breakdown; rerun `oel eval --round {round_id}`")
    return metrics


def compare(candidate: dict[str, Any], best: dict[str, Any], margin: float | str) -> dict[str, dict[str, Any]]:
    """Per game: both pass rates, the drop, the allowed drop and whether the candidate passes there."""
    out = {}
    for game, block in candidate["heldout"].items():
        if game == OVERALL:
            continue
        ref = best["heldout"].get(game)
        if ref is None:  # a game the champion never played: nothing to fall below
            out[game] = {"pass_rate": block["pass_rate"], "champion_pass_rate": None, "ok": True}
            continue
        drop, allowed = ref["pass_rate"] - block["pass_rate"], allowed_drop(ref, margin)
        out[game] = {"pass_rate": block["pass_rate"], "champion_pass_rate": ref["pass_rate"],
                     "episodes": block.get("episodes"), "champion_episodes": ref.get("episodes"),
                     "drop": drop, "allowed_drop": allowed, "ok": drop <= allowed + EPS}
    return out


def decide(params: Params, root: str | Path, round_id: str) -> dict[str, Any]:
    """The gate's decision for an evaluated round (pure: reads the evals, writes nothing)."""
    root = Path(root)
    best = champion(params, root, before=round_id)
    candidate, reference = _eval_of(root, round_id), _eval_of(root, best)
    margin = params.promotion.margin
    # A chat-log round (oel log-round) has a consolidation gap, not held-out games: nothing to compare.
    games = compare(candidate, reference, margin) if "heldout" in candidate and "heldout" in reference else {}
    ood = bool(candidate.get("ood_flag", candidate.get("ood", {}).get("flag", False)))
    worse = [g for g, c in games.items() if not c["ok"]]
    if params.promotion.policy == "always":
        promoted, reason = True, "promotion.policy is always: every round is promoted"
    elif not games and not ood:
        promoted = True
        reason = (f"promoted without a comparison: {round_id} or {best} has no held-out games in its eval "
                  f"(a chat-log round), so there is nothing to fall below")
    elif worse or ood:
        promoted = False
        why = [f"{g} {_pct(games[g]['pass_rate'])} vs {best}'s {_pct(games[g]['champion_pass_rate'])} "
               f"(drop {_pct(games[g]['drop'])} > allowed {_pct(games[g]['allowed_drop'])})" for g in worse]
        if ood:
            why.append("the OOD probe is flagged (dropped beyond eval.ood_drop_threshold vs base)")
        reason = f"kept back: {'; '.join(why)}; {best} stays champion"
    else:
        promoted = True
        reason = (f"promoted: no game below {best} by more than the allowed drop ("
                  + ", ".join(f"{g} {_pct(c['pass_rate'])} vs {_pct(c['champion_pass_rate'])}" for g, c in games.items())
                  + "), OOD not flagged")
    return {"round": round_id, "from": params.policy_of(round_id), "policy": params.promotion.policy,
            "margin": margin, "champion_before": best, "decision": CHAMPION if promoted else CHALLENGER,
            "champion_after": round_id if promoted else best, "reason": reason, "ood_flag": ood, "games": games,
            "pass_rate": candidate.get("heldout", {}).get(OVERALL, {}).get("pass_rate")}


def promote(params: Params, root: str | Path, round_id: str, track: bool = True) -> dict[str, Any]:
    """Decide, write reports/<r>/promotion.json, then mirror it into the MLflow registries (oel.registry)."""
    if round_id == BASE or round_id not in params.rounds:
        raise PromotionError(f"round {round_id!r} is not a declared round; the gate decides r1, r2, ... "
                             f"(declared: {', '.join(params.rounds)})")
    record = decide(params, root, round_id)
    write_json(ProjectPaths(Path(root)).round(round_id).promotion, record)
    log.info("promotion@%s: %s (%s)", round_id, record["decision"], record["reason"])
    if track:
        from oel import registry

        record = {**record, "registry": registry.register_round(params, Path(root), record)}
    return record


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def rounds_table(params: Params, root: str | Path) -> str:
    """`oel rounds`: one line per declared round (files only, so it works with no tracking server)."""
    project, found, tags = ProjectPaths(Path(root)), decisions(params, root), aliases(params, root)
    rows = [("round", "from", "alias", "gate", "pass rate", "reason")]
    for r in params.rounds:
        record = found.get(r)
        state = record["decision"] if record else "evaluated, not gated" if project.round(r).details.is_file() \
            else "not evaluated"
        rows.append((r, params.policy_of(r), tags.get(r, "—"), state,
                     _pct(record["pass_rate"]) if record else "—", record["reason"] if record else "—"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
             for row in rows]
    return "\n".join(lines) + f"\nnext round: {next_round(params, root)}"


def next_round(params: Params, root: str | Path) -> str:
    """What the next iteration runs, in words: the declared round not evaluated yet, or the one it declares."""
    from oel.rounds import next_round_id

    last = list(params.rounds)[-1]
    if not ProjectPaths(Path(root)).round(last).details.is_file():
        return f"{last}, from {params.policy_of(last)} (declared)"
    try:
        return f"{next_round_id(list(params.rounds))}, from {next_parent(params, root)}"
    except PromotionError as err:
        return f"? ({err})"

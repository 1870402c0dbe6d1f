"""The promotion gate: never make a round champion when any headline metric got worse beyond noise.

An independent re-run of OEL (ReSAIL) saw every setting end below its first round, because each round started
from the previous one whatever its eval said; and a gate that read pass rates alone promoted a 135M round whose
invalid-action rate rose from 90.5% [85.4, 94.0] to 99.0% [96.5, 99.7], both rounds solving 0/100 games.

So once a round is evaluated, it is compared with the current champion (round 0, `base`, until a round is
promoted) on the SAME held-out seeds, per game and on every headline metric, each with a paired test
(oel.paired) and a margin in params (`promotion.margins`):

  pass_rate              per game, exact McNemar on the games one policy won and the other lost
  invalid_action_rate    per game, paired bootstrap of the turn-level rate with games as clusters
  tokens_per_turn        per game, the same bootstrap on the relative change (more tokens is worse)
  ood_instruction_pass   the OOD probe's prompts, exact McNemar per prompt (IFEval: Fisher exact, unpaired)
  ood_loglik             the probe's held-out prose log-likelihood, relative drop (deterministic: no test)

The round becomes `champion` when no check blocks, else stays `challenger` and the champion stays; the reason
names every blocking metric with its numbers. A round whose distillation was skipped for lack of headroom is
`untrained`: its policy is its start policy, so there is nothing new to promote. `promotion.policy: always`
promotes every trained round (the loop without a gate). Pure: reads files, writes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from oel.artifacts import iter_jsonl, read_json
from oel.config import Params
from oel.errors import UserError
from oel.metrics import OVERALL
from oel.metrics import invalid_by_game as _invalid
from oel.metrics import tokens_by_game as _tokens
from oel.paired import Paired, proportions, ratio, successes
from oel.paths import ProjectPaths
from oel.rounds.records import (
    CHALLENGER,
    CHAMPION,
    UNTRAINED,
    Check,
    Decision,
    EvalView,
    read_eval,
)
from oel.schemas import Episode, TrainSummary


class PromotionError(UserError, ValueError):
    """A gate that cannot decide (missing eval, unknown alias); the message names the fix."""


def decide(params: Params, root: str | Path, round_id: str, champion: str) -> Decision:
    """The gate's decision for an evaluated round against `champion` (reads the evals, writes nothing)."""
    root = Path(root)
    candidate, reference = eval_of(root, round_id), eval_of(root, champion)
    start = params.policy_of(round_id)
    training = _training(root, round_id)
    untrained = training is not None and not training.trained
    checks = [] if untrained else compare(params, root, round_id, champion, candidate, reference)
    blocked = [f"{c.game} {c.metric}" for c in checks if c.blocked]
    if untrained:
        decision, reason = UNTRAINED, f"not trained: {training.skipped_reason}; {champion} stays champion"
    elif params.promotion.policy == "always":
        decision, reason = CHAMPION, "promotion.policy is always: every trained round is promoted"
    elif blocked:
        decision = CHALLENGER
        reason = f"kept back: {'; '.join(describe(c, champion) for c in checks if c.blocked)}; {champion} stays champion"
    elif not checks:
        decision = CHAMPION
        reason = (f"promoted without a comparison: {round_id} or {champion} has no held-out games or OOD probe in "
                  f"its eval (a chat-log round), so there is nothing to fall below")
    else:
        decision = CHAMPION
        reason = f"promoted: no headline metric worse than {champion}'s beyond its margin ({_summary(checks)})"
    held = candidate.heldout or {}
    return Decision(round=round_id, **{"from": start}, policy=params.promotion.policy, alpha=params.promotion.alpha,
                    champion_before=champion, decision=decision,
                    champion_after=round_id if decision == CHAMPION else champion, reason=reason, checks=checks,
                    blocked_by=blocked, pass_rate=held[OVERALL].pass_rate if OVERALL in held else None,
                    trained=decision != UNTRAINED)


def compare(params: Params, root: Path, round_id: str, champion: str, candidate: EvalView,
            reference: EvalView) -> list[Check]:
    """Every check of the candidate against the champion: per game (pass, invalid, tokens), then OOD."""
    checks: list[Check] = []
    if candidate.heldout and reference.heldout:
        mine, theirs = student_episodes(root, round_id), student_episodes(root, champion)
        for game in sorted(set(mine) & set(theirs)):
            checks += game_checks(params, game, mine[game], theirs[game])
    if candidate.ood is not None and reference.ood is not None:
        checks += ood_checks(params, candidate, reference)
    return checks


def game_checks(params: Params, game: str, mine: dict[int, Episode], theirs: dict[int, Episode]) -> list[Check]:
    """The three per-game checks on the seeds both policies played (the same held-out seeds every round)."""
    cfg, seeds = params.promotion, sorted(set(mine) & set(theirs))
    a, b = [mine[s] for s in seeds], [theirs[s] for s in seeds]
    if not seeds:
        return [Check(game=game, metric="pass_rate", test="none", pairs=0, candidate=0.0, champion=0.0, worse_by=0.0,
                      margin=cfg.margins.pass_rate, blocked=True,
                      note="no held-out seed in common: re-evaluate the champion with this eval's settings")]
    boot = {"resamples": cfg.bootstrap_resamples, "seed": params.seed}
    return [
        _check(game, "pass_rate", successes([e.success for e in a], [e.success for e in b],
                                            cfg.margins.pass_rate, cfg.alpha)),
        _check(game, "invalid_action_rate", ratio(_invalid(a), _invalid(b), cfg.margins.invalid_action_rate,
                                                  cfg.alpha, relative=False, **boot)),
        _check(game, "tokens_per_turn", ratio(_tokens(a), _tokens(b), cfg.margins.tokens_per_turn, cfg.alpha,
                                              relative=True, **boot)),
    ]


def ood_checks(params: Params, candidate: EvalView, reference: EvalView) -> list[Check]:
    """The OOD probe: paired per prompt when both evals list their prompts (the shipped probe), else the drop
    alone (IFEval reports only its scores); a different kind of OOD block is no comparison at all."""
    cfg, mine, theirs = params.promotion, candidate.ood, reference.ood
    if mine.source != theirs.source:
        return [Check(game="ood", metric="ood_instruction_pass", test="none", pairs=0,
                      candidate=mine.instruction_pass, champion=theirs.instruction_pass, worse_by=0.0,
                      margin=cfg.margins.ood_instruction_pass, blocked=False,
                      note=f"{mine.source} vs {theirs.source}: different probes, not compared")]
    out = []
    if mine.prompt_ids and theirs.prompt_ids:
        ids = sorted(set(mine.prompt_ids) & set(theirs.prompt_ids))
        failed_a, failed_b = set(mine.failed or ()), set(theirs.failed or ())
        out.append(_check("ood", "ood_instruction_pass", successes(
            [i not in failed_a for i in ids], [i not in failed_b for i in ids], cfg.margins.ood_instruction_pass,
            cfg.alpha)))
    else:  # IFEval: scores and prompt counts only
        counts = [(round(b.instruction_pass * (b.prompts or 0)), b.prompts or 0) for b in (mine, theirs)]
        out.append(_check("ood", "ood_instruction_pass", proportions(*counts, cfg.margins.ood_instruction_pass,
                                                                     cfg.alpha)))
    if mine.loglik_nats_per_token is not None and theirs.loglik_nats_per_token is not None:
        # Log-likelihood of fixed prose is deterministic: a relative drop beyond the margin is no noise.
        ref = abs(theirs.loglik_nats_per_token) or 1.0
        drop = (theirs.loglik_nats_per_token - mine.loglik_nats_per_token) / ref
        out.append(Check(game="ood", metric="ood_loglik", test="relative drop (deterministic)", pairs=0,
                         candidate=mine.loglik_nats_per_token, champion=theirs.loglik_nats_per_token, worse_by=drop,
                         margin=cfg.margins.ood_loglik, blocked=drop > cfg.margins.ood_loglik))
    return out


def student_episodes(root: Path, round_id: str) -> dict[str, dict[int, Episode]]:
    """game -> seed -> the policy's own held-out episode without knowledge (eval's student level)."""
    path = ProjectPaths(root).round(round_id).eval_episodes
    if not path.is_file():
        raise PromotionError(f"{path}: missing; rerun `oel eval --round {round_id}` (the gate pairs the "
                             f"held-out games of both policies)")
    out: dict[str, dict[int, Episode]] = defaultdict(dict)
    for ep in iter_jsonl(path, Episode):
        if ep.policy == round_id and ep.knowledge_store is None and ep.split == "heldout":
            out[ep.game][ep.seed] = ep
    return dict(out)


def eval_of(root: Path, round_id: str) -> EvalView:
    path = ProjectPaths(root).round(round_id).details
    if not path.is_file():
        raise PromotionError(f"{path}: missing; run `oel eval --round {round_id}` first (the gate compares evals)")
    view = read_eval(path)
    if view.heldout is not None and OVERALL not in view.heldout:
        raise PromotionError(f"{path}: a damaged `heldout` breakdown; rerun `oel eval --round {round_id}`")
    return view


def describe(c: Check, champion: str) -> str:
    """One blocking (or passing) check in words, with the numbers behind it."""
    unit = _rel if c.metric in ("tokens_per_turn", "ood_loglik") else _pct
    value = _fmt(c.metric)
    stat = "" if c.p_value is None else f", p={c.p_value:.3g}"
    where = "" if c.game == "ood" else f"{c.game} "
    change = f"worse by {unit(c.worse_by).lstrip('+')}" if c.worse_by >= 0 else f"better by {unit(-c.worse_by).lstrip('+')}"
    n = f", n={c.pairs}" if c.pairs else ""  # a deterministic check (the OOD log-likelihood) pairs nothing
    return (f"{where}{c.metric} {value(c.candidate)} vs {champion}'s {value(c.champion)} ({change}, "
            f"margin {unit(c.margin)}{stat}; {c.test}{n})"
            + (f": {c.note}" if c.note else ""))


def _summary(checks: list[Check]) -> str:
    return ", ".join(f"{'' if c.game == 'ood' else c.game + ' '}{c.metric} {_fmt(c.metric)(c.candidate)} vs "
                     f"{_fmt(c.metric)(c.champion)}" for c in checks)


def _check(game: str, metric: str, result: Paired) -> Check:
    return Check(game=game, metric=metric, **result.as_dict())


def _training(root: Path, round_id: str) -> TrainSummary | None:
    path = ProjectPaths(root).round(round_id).model / "train_summary.json"
    return read_json(path, TrainSummary) if path.is_file() else None


def _fmt(metric: str):
    if metric == "tokens_per_turn":
        return lambda x: f"{x:.1f}"
    if metric == "ood_loglik":
        return lambda x: f"{x:.3f}"
    return _pct


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _rel(x: float) -> str:
    return f"{100 * x:+.1f}%"

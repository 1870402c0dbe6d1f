"""`oel report`: one Markdown (+ HTML) page across every finished round -> reports/summary.md.

Per game first: findings in plain words (each game, then pooled), the per-game table (base / teacher /
student / headroom, tokens), then the per-round table pooled over games (with OOD), the plots, each
round's knowledge stores by game, and a few held-out trajectories. Every number pooled across games
says "pooled": games differ a lot in difficulty, so a pooled rate can hide what happened in each. Model output and
knowledge are untrusted text: they only ever appear inside code fences, which Markdown renders (and the
HTML conversion escapes) verbatim.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from oel.artifacts import ArtifactError, iter_jsonl, read_json, read_store, write_text
from oel.config import Params, load_params
from oel.metrics import OVERALL, POOLED, detectable_difference
from oel.paths import ProjectPaths
from oel.plots import curve_row, plot_rounds
from oel.schemas import Episode

log = logging.getLogger(__name__)
MAX_STORE_CHARS = 4000
MAX_FIELD_CHARS = 600
SAMPLES_PER_ROUND = 2


def round_order(params: Params) -> list[str]:
    return ["base", *params.rounds]


def finished_rounds(params: Params, root: Path, upto: str | None = None) -> list[str]:
    """Rounds with an eval breakdown (reports/<r>/eval.json), in order; `upto` cuts the list after that round."""
    order = round_order(params)
    if upto is not None and upto in order:
        order = order[:order.index(upto) + 1]
    return [r for r in order if ProjectPaths(root).round(r).details.is_file()]


def load_metrics(root: Path, round_id: str) -> dict[str, Any]:
    """A round's eval.json, its shape checked first (oel.rounds.records.ReportView)."""
    from oel.rounds.records import ReportView

    return read_json(ProjectPaths(root).round(round_id).details, ReportView).model_dump(mode="json",
                                                                                         exclude_unset=True)


def curve_rows(params: Params, root: Path, upto: str | None = None) -> list[dict[str, Any]]:
    return [curve_row(step, r, load_metrics(root, r))
            for step, r in enumerate(finished_rounds(params, root, upto))]


def write_report(params_file: Path, root: Path) -> Path:
    """Write reports/summary.md and reports/summary.html; returns the Markdown path."""
    params = load_params(params_file)
    root = Path(root)
    rounds = finished_rounds(params, root)
    if not rounds:
        from oel.errors import UserError

        raise UserError(f"{root / 'reports'}: no finished round (no reports/<round>/eval.json); "
                        f"run `oel eval --round base` or `dvc repro` first")
    metrics = {r: load_metrics(root, r) for r in rounds}
    reports = ProjectPaths(root).reports
    md = render(params, root, rounds, metrics)  # first: a damaged input fails before anything is written
    # Rounds on chat logs have no pass rate to draw (their gap is tabulated in the report).
    plot_rounds([row for row in curve_rows(params, root) if row["pass_rate"] is not None],
                reports / "plots" / "rounds.png")
    write_text(reports / "summary.md", md)
    write_text(reports / "summary.html", to_html(md))
    return reports / "summary.md"


def render(params: Params, root: Path, all_rounds: list[str], metrics: dict[str, dict[str, Any]]) -> str:
    rounds = [r for r in all_rounds if "heldout" in metrics[r]]  # game rounds; log rounds have a gap instead
    logs = [r for r in all_rounds if "gap" in metrics[r]]
    parts = [
        f"# OEL report\n\nModel `{params.model.name}`; games {', '.join(params.games.enabled())}; "
        f"{params.eval.episodes_per_game} held-out games per game and round (the same seeds every round). "
        + power_sentence(params),
        "## Findings\n\n" + "\n".join(f"- {line}" for line in findings(rounds, metrics)),
        "## Per game\n\n" + games_table(rounds, metrics),
        f"## Rounds ({POOLED} over games)\n\n" + rounds_table(params, rounds, metrics),
        headroom_section(params, root, rounds),
        promotion_section(params, root, rounds),
        drift_section(params, rounds, metrics),
        *([logs_section(params, logs, metrics)] if logs else []),
        plots_section(root, rounds),
        stores_section(root, all_rounds),
        samples_section(root, rounds),
        DEFINITIONS,
    ]
    return "\n\n".join(parts) + "\n"


def power_sentence(params: Params) -> str:
    """What the held-out sizes can resolve, so no one reads a difference the eval cannot see."""
    n = params.eval.episodes_per_game
    stores = params.eval.teacher_stores or params.extract.stores
    return (f"With {n} games each, two rounds' pass rates (or invalid-action rates) for one game differ beyond "
            f"noise when they are at least {100 * detectable_difference(n):.0f} points apart (95% two-sided, 80% "
            f"power, worst case near 50%; {100 * detectable_difference(n, 0.1):.0f} points near 10% or 90%); "
            f"pooled over games the smallest such change is smaller. Games are the unit for both (an "
            f"invalid-action rate's interval counts a game's turns as one cluster). " + teacher_sentence(params, stores))


def teacher_sentence(params: Params, stores: int) -> str:
    if not params.eval.with_knowledge:
        return ("No teacher level on held-out seeds (`eval.with_knowledge: false`): the headroom check measured the "
                "teacher against the start policy on the round's own seeds, paired (Headroom before training).")
    return (f"The teacher level plays {stores} of {params.extract.stores} stores per game, so its per-store rates "
            f"are noisier than its mean.")


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _invalid(block: dict[str, Any]) -> str:
    """The invalid-action rate with its 95% interval (games as clusters) where the eval recorded one."""
    rate = _pct(block["invalid_action_rate"])
    if "invalid_ci_low" not in block:  # an eval.json from before the interval
        return rate
    return f"{rate} ({_pct(block['invalid_ci_low'])}–{_pct(block['invalid_ci_high'])})"


def _tokens(block: dict[str, Any]) -> str:
    mean = _num(block["response_tokens_per_turn"])
    if "tokens_per_turn_ci_low" not in block:
        return mean
    return f"{mean} ({_num(block['tokens_per_turn_ci_low'])}–{_num(block['tokens_per_turn_ci_high'])})"


def _from(params: Params, r: str) -> str:
    return "—" if r == "base" else params.policy_of(r) if r in params.rounds else "?"


def findings(rounds: list[str], metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Plain statements a reader should not have to dig out of the tables, zero results included:
    one per game and round, then the round pooled over games."""
    out = []
    for r in rounds:
        m = metrics[r]
        games = [g for g in m["heldout"] if g != OVERALL]
        out += [finding(f"`{r}` {game}", m, game) for game in games]
        if len(games) > 1:  # one game: the pooled line would repeat it
            out.append(finding(f"`{r}` {POOLED} over {len(games)} games", m, OVERALL))
    return out


def finding(label: str, m: dict[str, Any], game: str) -> str:
    o = m["heldout"][game]
    line = (f"{label}: {o['passed']}/{o['episodes']} held-out games solved ({_pct(o['pass_rate'])}, 95% CI "
            f"{_pct(o['pass_ci_low'])}–{_pct(o['pass_ci_high'])})")
    untrained = m.get("untrained")
    if isinstance(untrained, dict):
        start = _inline(str(untrained.get("from")))
        line += (f" — not trained ({_inline(untrained.get('reason'))}): its policy is {start}'s weights, so these "
                 f"are {start}'s numbers, not played again")
    if o["passed"] == 0:
        line += " — the policy solved none; small models are expected to score about 0 on these games"
    if game in m.get("headroom", {}):
        h = m["headroom"][game]
        # The held-out pass-rate gap only; whether distill trained is the headroom stage's verdict, which reads
        # every headline metric on the round's own seeds (the "Headroom before training" table).
        line += f"; knowledge in context {'raised' if h > 0 else 'did not raise'} the round-start policy's pass " \
                f"rate (teacher minus student {_pct(h)})"
    return line + "."


def rounds_table(params: Params, rounds: list[str], metrics: dict[str, dict[str, Any]]) -> str:
    head = (f"| round | from | student pass, {POOLED} (95% CI) | teacher pass, {POOLED} | headroom, {POOLED} "
            f"| tokens/turn (95% CI) | tokens/game | turns/game | invalid actions (95% CI) | OOD instr. pass "
            f"| OOD loglik |\n"
            + "|---" * 11 + "|")
    rows = []
    for r in rounds:
        m = metrics[r]
        o = m["heldout"][OVERALL]
        t = m.get("teacher", {}).get("mean", {}).get(OVERALL, {})
        ood = m.get("ood", {})
        rows.append(f"| {r} | {_from(params, r)} | {_pct(o['pass_rate'])} ({_pct(o['pass_ci_low'])}–"
                    f"{_pct(o['pass_ci_high'])}) | {_pct(t.get('pass_rate'))} | {_pct(m.get('headroom', {}).get(OVERALL))} "
                    f"| {_tokens(o)} | {_num(o['tokens_per_game'])} | {_num(o['turns_per_game'], 2)} "
                    f"| {_invalid(o)} | {_pct(ood.get('instruction_pass'))} "
                    f"| {_num(ood.get('loglik_nats_per_token'), 3)} |")
    return "\n".join([head, *rows])


def games_table(rounds: list[str], metrics: dict[str, dict[str, Any]]) -> str:
    base = metrics.get("base", {}).get("heldout", {})
    head = ("| round | game | base | teacher (round-start + this game's knowledge) | student | headroom "
            "| games | turns | tokens/turn (95% CI) | invalid actions (95% CI) |\n" + "|---" * 10 + "|")
    rows = []
    for r in rounds:
        m = metrics[r]
        teacher = m.get("teacher", {}).get("mean", {})
        for game, g in m["heldout"].items():
            if game == OVERALL:
                continue
            rows.append(f"| {r} | {game} | {_pct(base.get(game, {}).get('pass_rate'))} "
                        f"| {_pct(teacher.get(game, {}).get('pass_rate'))} | {_pct(g['pass_rate'])} "
                        f"| {_pct(m.get('headroom', {}).get(game))} "
                        f"| {g['episodes']} | {g.get('turns', '—')} | {_tokens(g)} | {_invalid(g)} |")
    return "\n".join([head, *rows])


def logs_section(params: Params, rounds: list[str], metrics: dict[str, dict[str, Any]]) -> str:
    """Rounds on imported chat logs: the consolidation gap on held-out conversations, reply length, OOD."""
    head = ("| round | from | held-out prompts | consolidation gap at start (95% CI) | after (95% CI) "
            "| reduction (paired 95% CI) | reply tokens start → after | OOD instr. pass start → after "
            "| OOD flag |\n" + "|---" * 9 + "|")
    rows = []
    for r in rounds:
        m, g = metrics[r], metrics[r]["gap"]
        s, a = g["start"], g["after"]
        ood, ood0 = m.get("ood", {}), m.get("ood_start", {})
        rows.append(f"| {r} | {_from(params, r)} | {g['prompts']} | {s['kl_mean']:.4f} ({s['kl_ci_low']:.4f}–"
                    f"{s['kl_ci_high']:.4f}) | {a['kl_mean']:.4f} ({a['kl_ci_low']:.4f}–{a['kl_ci_high']:.4f}) "
                    f"| {g['reduction_mean']:+.4f} ({g['reduction_ci_low']:+.4f}–{g['reduction_ci_high']:+.4f}) "
                    f"| {s['response_tokens_mean']:.1f} → {a['response_tokens_mean']:.1f} "
                    f"| {_pct(ood0.get('instruction_pass'))} → {_pct(ood.get('instruction_pass'))} "
                    f"| {'yes' if ood.get('flag') else 'no' if ood else '—'} |")
    return ("## Rounds on chat logs\n\nNo game: the eval is the consolidation gap, the mean per-token "
            "KL(student ‖ teacher) on held-out conversations (the teacher is the round-start policy with a store "
            "in its system message); lower after distillation = the knowledge moved into the weights.\n\n"
            + "\n".join([head, *rows]))


def promotion_section(params: Params, root: Path, rounds: list[str]) -> str:
    """Each round's headroom verdict, the gate's decision, every metric it checked and any person's override."""
    from oel.rounds.gate import describe
    from oel.rounds.lifecycle import aliases, decisions, next_round

    found, tags = decisions(params, root), aliases(params, root)
    cfg = params.promotion
    m = cfg.margins
    lines = ["## Promotion", "",
             f"Gate: `promotion.policy: {cfg.policy}`. A round is compared with the champion on the same held-out "
             f"seeds, per game and on every headline metric, by a paired one-sided test at alpha {cfg.alpha:g} "
             f"(pass rates: exact McNemar on the games one policy won and the other lost; invalid-action rate and "
             f"tokens per turn: a paired bootstrap with games as clusters; OOD: exact McNemar per probe prompt). "
             f"It is kept back when any metric is worse beyond noise and beyond its margin (pass rate "
             f"{_pct(m.pass_rate)}, invalid actions {_pct(m.invalid_action_rate)}, tokens per turn "
             f"+{_pct(m.tokens_per_turn)}, OOD instruction pass {_pct(m.ood_instruction_pass)}, OOD log-likelihood "
             f"-{_pct(m.ood_loglik)}). A round kept back stays `challenger` and the next round starts from the "
             f"`champion` (MLflow registry `oel-policy`); a round without headroom is not trained (`untrained`).",
             "", "| round | from | trained | gate | alias now | reason |", "|---|---|---|---|---|---|"]
    for r in [r for r in rounds if r in params.rounds]:
        record = found.get(r)
        reason = _cell(record.reason) if record else "not gated yet"
        trained = "—" if record is None else "yes" if record.trained else "no (no headroom)"
        lines.append(f"| {r} | {_from(params, r)} | {trained} | {record.decision if record else '—'} "
                     f"| {tags.get(r, '—')} | {reason} |")
    checks = [(r, c, rec.champion_before) for r, rec in found.items() if r in rounds for c in rec.checks]
    if checks:
        lines += ["", "Every check (worse by: absolute for rates, relative for tokens and log-likelihood; p: "
                  "one-sided, paired):", "", "| round | vs | game | metric | verdict | detail |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r} | {champ} | {c.game} | {c.metric} | {'**blocks**' if c.blocked else 'ok'} "
                  f"| {_cell(describe(c, champ))} |" for r, c, champ in checks]
    events = [(r, e) for r, rec in found.items() for e in rec.events]
    if events:
        lines += ["", "After the gate: a person's overrides (`oel promote --force`, `oel rollback`) and the canary's "
                  "verdicts on its users' ratings (`oel canary`):", ""]
        lines += [f"- {e.at}: {e.kind} of {r}: champion {e.champion_before} → {e.champion_after} — "
                  f"{_inline(e.reason)}" for r, e in events]
    return "\n".join([*lines, "", f"Next round: {next_round(params, root)}."])


def headroom_section(params: Params, root: Path, rounds: list[str]) -> str:
    """The headroom stage's verdict per round (reports/<r>/headroom.json): did distill have anything to move?"""
    from oel.schemas import HeadroomVerdict

    lines = ["## Headroom before training", "",
             "Before distill, the round's start policy played its own user-side seeds without knowledge and with "
             "each store (never held-out seeds); distill trains only where the teacher is better beyond noise "
             f"(`distill.require_headroom: {str(params.distill.require_headroom).lower()}`).", "",
             "| round | games per game | headroom | reason |", "|---|---|---|---|"]
    rows, checks = [], []
    for r in [r for r in rounds if r in params.rounds]:
        path = ProjectPaths(root).round(r).headroom
        if path.is_file():
            v = read_json(path, HeadroomVerdict)
            rows.append(f"| {r} | {v.episodes_per_game} | {'yes' if v.headroom else 'no'} | {_cell(v.reason)} |")
            checks += [headroom_row(r, name, c) for name, c in v.checks.items()]
    if not rows:
        return "\n".join(lines[:3] + ["", "No round has a headroom verdict yet."])
    if checks:
        rows += ["", "Every check (the teacher against the start policy without knowledge, or with the placebo "
                 "paragraph (`headroom.placebo`) where the check says so, on the same seeds; p: one-sided, paired):",
                 "", "| round | check | teacher | without knowledge (or placebo) | p | test, games | teacher better |",
                 "|---|---|---|---|---|---|---|", *checks]
    return "\n".join(lines + rows)


def headroom_row(r: str, name: str, check: dict[str, Any]) -> str:
    """One headroom check: `candidate` is the start policy without knowledge (or with the placebo), `champion` the
    teacher (oel.headroom asks whether the other is worse than the teacher, so `blocked` = the teacher is better)."""
    value = _num if "tokens_per_turn" in name else _pct
    p = check.get("p_value")
    return (f"| {r} | {_cell(name)} | {value(check.get('champion'))} | {value(check.get('candidate'))} "
            f"| {'—' if p is None else f'{p:.3g}'} | {_cell(str(check.get('test', '')))}, {check.get('pairs', '—')} "
            f"| {'**yes**' if check.get('blocked') else 'no'} |")


def drift_section(params: Params, rounds: list[str], metrics: dict[str, dict[str, Any]]) -> str:
    """Each round's teacher next to its start round's teacher: does the with-knowledge view decay?"""
    lines = ["## Teacher drift", "", "Each round's teacher (its start policy with this round's knowledge) next to "
             "its start round's teacher (that round's start policy with that round's knowledge), on the same "
             "held-out seeds: a falling teacher means training eroded the with-knowledge view the next round "
             "relies on (an independent re-run of OEL saw 61.5% → 44.8%; `distill.retention_weight` counters it).",
             "", "| round | game | teacher | start round's teacher | drift |", "|---|---|---|---|---|"]
    rows = []
    for r in rounds:
        start = _from(params, r)
        if start not in metrics or "teacher" not in metrics[r] or "teacher" not in metrics[start]:
            continue
        now, before = metrics[r]["teacher"]["mean"], metrics[start]["teacher"]["mean"]
        for game in [g for g in now if g in before]:
            delta = now[game]["pass_rate"] - before[game]["pass_rate"]
            rows.append(f"| {r} | {POOLED if game == OVERALL else game} | {_pct(now[game]['pass_rate'])} "
                        f"| {_pct(before[game]['pass_rate'])} ({start}) | {'+' if delta >= 0 else ''}{_pct(delta)} |")
    if rows:
        return "\n".join(lines + rows)
    why = ("The teacher level is off (`eval.with_knowledge: false`), so there is no held-out teacher to compare."
           if not params.eval.with_knowledge else "No round has a start round with a teacher level yet (from round 2 on).")
    return "\n".join(lines[:3] + ["", why])


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def plots_section(root: Path, rounds: list[str]) -> str:
    lines = ["## Plots", "", "![pass rate and response tokens by round](plots/rounds.png)"]
    for r in rounds:
        if (ProjectPaths(root).round(r).plots / "levels.png").is_file():
            lines += ["", f"![round {r}: base vs teacher vs student]({r}/plots/levels.png)"]
    return "\n".join(lines)


def fence(text: str, info: str = "text") -> str:
    """A code fence longer than any backtick run inside, so untrusted text cannot close it early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{info}\n{text}\n{ticks}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} more characters]"


def stores_section(root: Path, rounds: list[str]) -> str:
    lines = ["## Knowledge stores", "", "Stores are per game: a game's teacher reads only its own game's stores."]
    for r in rounds:
        for game, stores in ProjectPaths(root).round(r).store_files().items():
            for k, path in stores:
                lines += ["", f"### {r} — {game} store {k}", "",
                          fence(_cut(read_store(path), MAX_STORE_CHARS), "markdown")]
    if len(lines) == 3:
        lines += ["", "No round has knowledge stores yet."]
    return "\n".join(lines)


def pick_samples(episodes: list[Episode], round_id: str, n: int = SAMPLES_PER_ROUND) -> list[Episode]:
    """The student's own held-out games: a success first when there is one, then failures."""
    own = [ep for ep in episodes if ep.knowledge_store is None and ep.policy == round_id]
    return (sorted(own, key=lambda ep: not ep.success))[:n]


def _inline(text: str | None) -> str:
    """Untrusted text inside a sentence: a code span (escaped on rendering) it cannot close early."""
    return "none" if text is None else f"`{' '.join(text.replace('`', '').split())[:80] or ' '}`"


def render_episode(ep: Episode) -> str:
    lines = [f"**{ep.game}** seed {ep.seed}: {'success' if ep.success else 'failure'} "
             f"(reward {ep.reward:g}, {len(ep.turns)} turns)"]
    for t in ep.turns:
        lines += ["", f"Turn {t.index}: action {_inline(t.action)}, {'valid' if t.valid else 'invalid'}, "
                      f"{t.response_tokens} tokens. Response, then the game's answer:",
                  "", fence(_cut(t.response, MAX_FIELD_CHARS)), "", fence(_cut(t.observation, MAX_FIELD_CHARS))]
    lines += ["", "Feedback:", "", fence(_cut(ep.feedback, MAX_FIELD_CHARS))]
    return "\n".join(lines)


def samples_section(root: Path, rounds: list[str]) -> str:
    lines = ["## Sample held-out trajectories"]
    for r in rounds:
        path = ProjectPaths(root).round(r).eval_episodes
        try:
            episodes = list(iter_jsonl(path, Episode)) if path.is_file() else []
        except ArtifactError as err:
            log.warning("report: skipping samples of %s: %s", r, err)
            episodes = []
        samples = pick_samples(episodes, r)
        if samples:
            lines += ["", f"### {r}", *("\n" + render_episode(ep) for ep in samples)]
    return "\n".join(lines)


DEFINITIONS = """## Metric definitions

- **pass rate**: fraction of held-out games with reward 1 (the reference code's `held_out_acc`), with a 95%
  Wilson score interval.
- **student**: the round's policy with no knowledge in context. **teacher**: the round's *start* policy with
  one knowledge store *of the same game* in context (the distillation teacher), pooled over that game's
  stores. **base**: round 0.
- **headroom**: teacher pass rate minus the start policy's pass rate without knowledge.
- **pooled**: over every game's episodes together (games have equal held-out counts); read the per-game
  rows first, games differ a lot in difficulty.
- **tokens/turn**: mean generated tokens per model call (`avg_response_length`); **tokens/game**: mean total
  response tokens per game (`avg_traj_tokens`); **turns/game**: mean model calls per game (`avg_num_steps`).
- **invalid actions**: fraction of turns whose action the game rejected or could not parse. Its 95% interval,
  and that of tokens/turn, counts the turns of one game as one cluster (games are the independent units, so
  the interval is wider than a binomial one over turns).
- **OOD instr. pass**: fraction of the project's verifiable-instruction prompts whose every check passes
  (greedy decoding); **OOD loglik**: mean log-likelihood of held-out prose (nats/token, higher is better).
  The promotion gate compares both with the champion's (section Promotion)."""


def to_html(md: str) -> str:
    import markdown

    body = markdown.markdown(md, extensions=["tables", "fenced_code"])
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>OEL report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}pre{background:#f6f6f6;padding:6px;overflow-x:auto}"
            "</style></head><body>\n" + body + "\n</body></html>\n")

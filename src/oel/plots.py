"""Curves by round: the row of one round's eval (also written for `dvc plots`) and matplotlib PNGs (Agg).

The paper's Figure 1 is pass rate and response length against the round. Which rounds a curve holds is the
caller's choice: eval draws its policy's lineage, the report (oel.rounds.report) every finished round.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from oel.artifacts import atomic_open
from oel.metrics import OVERALL

log = logging.getLogger(__name__)
COLORS = {"base": "#9e9e9e", "start": "#9e9e9e", "teacher": "#f28e2b", "student": "#4e79a7"}


def curve_row(step: int, round_id: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One flat row per round: what `dvc plots` draws and what the report tabulates."""
    held = metrics.get("heldout", {})
    overall = held.get(OVERALL, {})
    teacher = metrics.get("teacher", {}).get("mean", {}).get(OVERALL, {})
    ood = metrics.get("ood", {})
    row: dict[str, Any] = {
        "step": step, "round": round_id,
        "pass_rate": overall.get("pass_rate"),
        "pass_ci_low": overall.get("pass_ci_low"),
        "pass_ci_high": overall.get("pass_ci_high"),
        "response_tokens_per_turn": overall.get("response_tokens_per_turn"),
        "tokens_per_game": overall.get("tokens_per_game"),
        "teacher_pass_rate": teacher.get("pass_rate"),
        "headroom": metrics.get("headroom", {}).get(OVERALL),
        "ood_instruction_pass": ood.get("instruction_pass"),
        "ood_loglik": ood.get("loglik_nats_per_token"),
    }
    for game, block in held.items():
        if game != OVERALL:
            row[f"pass_rate_{game}"] = block.get("pass_rate")
    return row


def write_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """JSON list of flat rows (DVC plots reads it: x=step, y=pass_rate / response_tokens_per_turn)."""
    import json

    with atomic_open(path) as fh:
        json.dump(rows, fh, indent=2)
        fh.write("\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> Path:
    """Pass rate (with 95% CI, per game, and the teacher level) and response tokens per turn, by round."""
    plt = _pyplot()
    xs = [r["step"] for r in rows]
    fig, (ax_pass, ax_tok) = plt.subplots(1, 2, figsize=(10, 3.8))
    _pass_panel(ax_pass, rows, xs)
    ax_tok.plot(xs, [_nan(r["response_tokens_per_turn"]) for r in rows], "o-", color=COLORS["student"])
    ax_tok.set_title("Response tokens per turn (held-out)")
    ax_tok.set_ylim(bottom=0)
    for ax in (ax_pass, ax_tok):
        ax.set_xticks(xs, [r["round"] for r in rows])
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _pass_panel(ax, rows: list[dict[str, Any]], xs: list[int]) -> None:
    ys = [_nan(r["pass_rate"]) for r in rows]
    # max(0, .): at 0 wins Wilson's low bound can come out a float hair above 0, and matplotlib refuses
    # a negative error bar (a round that solved nothing crashed eval's plot).
    err = [[max(0.0, y - _nan(r["pass_ci_low"])) for y, r in zip(ys, rows, strict=True)],
           [max(0.0, _nan(r["pass_ci_high"]) - y) for y, r in zip(ys, rows, strict=True)]]
    ax.errorbar(xs, ys, yerr=err, fmt="o-", color=COLORS["student"], capsize=3, label="policy, no knowledge")
    games = sorted({k.removeprefix("pass_rate_") for r in rows for k in r if k.startswith("pass_rate_")})
    for game in games:
        ax.plot(xs, [_nan(r.get(f"pass_rate_{game}")) for r in rows], "--", alpha=0.6, label=game)
    teacher = [(x, r["teacher_pass_rate"]) for x, r in zip(xs, rows, strict=True) if r["teacher_pass_rate"] is not None]
    if teacher:
        ax.plot(*zip(*teacher, strict=True), "x", color=COLORS["teacher"], markersize=9,
                label="round-start policy + knowledge")
    ax.set_title("Held-out pass rate (95% Wilson CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)


def plot_levels(levels: dict[str, dict[str, float]], path: Path, round_id: str) -> Path:
    """Grouped bars per game: base vs teacher vs student pass rate (`levels[level][game]`)."""
    plt = _pyplot()
    games = sorted({g for block in levels.values() for g in block}, key=lambda g: (g == OVERALL, g))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(games) + 2), 3.6))
    width = 0.8 / max(1, len(levels))
    for i, (level, block) in enumerate(levels.items()):
        xs = [j + i * width for j in range(len(games))]
        bars = ax.bar(xs, [block.get(g, 0.0) for g in games], width, label=level, color=COLORS.get(level))
        # Printed values: a zero pass rate is a result and must be visible, not an empty plot.
        ax.bar_label(bars, labels=[f"{100 * block.get(g, 0.0):.0f}%" for g in games], fontsize=7)
    ax.set_xticks([j + width * (len(levels) - 1) / 2 for j in range(len(games))], games)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("pass rate")
    ax.set_title(f"Round {round_id}: {' vs '.join(levels)} pass rate")
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def levels_of(metrics: dict[str, Any], start: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Pass rate per game for each level present: the start policy without knowledge (its held-out block),
    teacher (stores, mean), student."""
    def rates(block: dict[str, Any]) -> dict[str, float]:
        return {g: b["pass_rate"] for g, b in block.items()}

    out: dict[str, dict[str, float]] = {}
    if start is not None:
        out["start"] = rates(start)
    if "teacher" in metrics:
        out["teacher"] = rates(metrics["teacher"]["mean"])
    out["student"] = rates(metrics.get("heldout", {}))
    return out


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)

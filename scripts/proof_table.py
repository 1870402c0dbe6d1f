"""Print the CPU proof's tables (reports/cpu-proof.md) from one proof folder.

    .venv/bin/python scripts/proof_table.py .cache/proof/users

Per round and game: base (round 0, no knowledge), teacher (the round's start policy with its store 0 in
context) and student (the round's policy, no knowledge) on the same held-out seeds, each with its pass
rate and 95% Wilson interval, how many passed on the first model call (for users: the first reply
already met the preference, before any feedback), invalid-action rate (with its Wilson interval over turns) and
response tokens per turn (for users a turn is one reply). Then the paired comparisons of those levels on the
same seeds: seeds only the first level passed, seeds only the second passed, and the exact McNemar test
(the two-sided binomial test of those discordant counts at 1/2, scipy). Then every item the round's extractor
wrote (data/<round>/knowledge/items.jsonl, verbatim) and what its stores kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import binomtest

from oel.config import load_params
from oel.metrics import wilson_interval

LEVELS = ("base", "teacher", "student")
PAIRS = (("base", "teacher"), ("base", "student"), ("teacher", "student"))


def rate(block: dict) -> str:
    return f"{block['passed']}/{block['episodes']} = {block['pass_rate']:.1%} [{block['pass_ci_low']:.1%}, " \
           f"{block['pass_ci_high']:.1%}]"


def invalid(block: dict) -> str:
    turns = round(block["turns_per_game"] * block["episodes"])
    bad = round(block["invalid_action_rate"] * turns)
    low, high = wilson_interval(bad, turns)
    return f"{bad}/{turns} = {block['invalid_action_rate']:.1%} [{low:.1%}, {high:.1%}]"


def level_episodes(root: Path, round_id: str) -> dict[tuple[str, str], list[dict]]:
    """(game, level) -> held-out episodes of data/<round>/eval/episodes.jsonl. Teacher: the round's start policy
    with store 0; other policies with a store (eval's drift check), other stores and the start policy without
    one are left out."""
    start = None if round_id == "base" else load_params(root / "params.yaml").policy_of(round_id)
    out: dict[tuple[str, str], list[dict]] = {}
    for line in (root / "data" / round_id / "eval" / "episodes.jsonl").read_text("utf-8").splitlines():
        ep = json.loads(line)
        store = ep["knowledge_store"]
        level = "base" if round_id == "base" else "teacher" if store == 0 and ep["policy"] == start else \
            "student" if store is None and ep["policy"] == round_id else None
        if level:
            out.setdefault((ep["game"], level), []).append(ep)
    return out


def first_call_wins(episodes: list[dict]) -> int:
    return sum(ep["success"] and len(ep["turns"]) == 1 for ep in episodes)


def paired(first: list[dict], second: list[dict]) -> str:
    """Same seeds, two levels: how many only the first passed, only the second, and the exact McNemar p."""
    a = {ep["seed"]: ep["success"] for ep in first}
    b = {ep["seed"]: ep["success"] for ep in second}
    seeds = sorted(set(a) & set(b))
    lost = sum(a[s] and not b[s] for s in seeds)
    gained = sum(b[s] and not a[s] for s in seeds)
    p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    change = (gained - lost) / len(seeds) if seeds else 0.0
    return f"{len(seeds)} | {lost} | {gained} | {change:+.1%} | {p:.3g}"


def tables(root: Path) -> list[str]:
    base = json.loads((root / "reports" / "base" / "eval.json").read_text("utf-8"))["heldout"]
    base_eps = level_episodes(root, "base")
    rates = ["| round | game | level | pass rate [95% CI] | passed on call 1 | invalid actions [95% CI] | "
             "tokens / turn |", "|---|---|---|---|---|---|---|"]
    pairs = ["| round | game | A -> B | paired seeds | passed A only | passed B only | change | exact McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for details in sorted((root / "reports").glob("r*/eval.json"), key=lambda p: int(p.parent.name[1:])):
        round_id = details.parent.name
        metrics = json.loads(details.read_text("utf-8"))
        eps = {**level_episodes(root, round_id), **base_eps}
        for game, student in metrics["heldout"].items():
            if game == "overall":
                continue
            blocks = {"base": base[game], "teacher": metrics.get("teacher", {}).get("mean", {}).get(game),
                      "student": student}
            rates += [f"| {round_id} | {game} | {name} | {rate(b)} | {first_call_wins(eps.get((game, name), []))}/"
                      f"{b['episodes']} | {invalid(b)} | {b['response_tokens_per_turn']:.1f} |"
                      for name, b in blocks.items() if b]
            pairs += [f"| {round_id} | {game} | {x} -> {y} | {paired(eps[(game, x)], eps[(game, y)])} |"
                      for x, y in PAIRS if (game, x) in eps and (game, y) in eps]
    return rates + ["", *pairs]


def headroom(root: Path) -> list[str]:
    """Each round's verdict before distill: did the teacher beat the start policy on its own seeds, and on what."""
    out = ["", "| round | headroom | games per game | reason |", "|---|---|---|---|"]
    for path in sorted((root / "reports").glob("r*/headroom.json"), key=lambda p: int(p.parent.name[1:])):
        v = json.loads(path.read_text("utf-8"))
        out.append(f"| {v['round']} | {'yes' if v['headroom'] else 'no'} | {v['episodes_per_game']} | {v['reason']} |")
        for name, c in v.get("checks", {}).items():
            p = "—" if c["p_value"] is None else f"{c['p_value']:.3g}"
            out.append(f"|  | {name} | start {c['candidate']:.3g}, teacher {c['champion']:.3g} | p = {p} ({c['test']}) |")
    return out if len(out) > 3 else []


def items(root: Path) -> list[str]:
    out = []
    for path in sorted((root / "data").glob("r*/knowledge/items.jsonl")):
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
        out.append(f"\n{path.relative_to(root)}: {len(rows)} items, as written\n")
        out += [f"    [{r['game']} store {r['store']} step {r['step']}] {r['text']}" for r in rows] or ["    (none)"]
    for store in sorted((root / "data").glob("r*/knowledge/stores/*/store-*.md")):
        out.append(f"\n{store.relative_to(root)} (what the teacher reads):\n")
        out += [f"    {line}" for line in store.read_text("utf-8").splitlines()] or ["    (empty)"]
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/proof/users")
    print("\n".join(tables(folder) + headroom(folder) + items(folder)))  # noqa: T201 - a script's output

"""Print the CPU proof's table (reports/cpu-proof.md) from one proof folder's reports/<round>/eval.json.

    .venv/bin/python scripts/proof_table.py .cache/proof/users

Per round and game: base (round 0, no knowledge), teacher (the round's start policy with its store in
context) and student (the round's policy, no knowledge) on the same held-out seeds, each with its pass
rate and 95% Wilson interval, how many passed on the first model call (for users: the first reply
already met the preference, before any feedback), invalid-action rate (with its Wilson interval over turns) and response
tokens per turn; then every item the round's stores hold.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from oel.config import load_params
from oel.metrics import wilson_interval


def rate(block: dict) -> str:
    return f"{block['passed']}/{block['episodes']} = {block['pass_rate']:.1%} [{block['pass_ci_low']:.1%}, " \
           f"{block['pass_ci_high']:.1%}]"


def invalid(block: dict) -> str:
    turns = round(block["turns_per_game"] * block["episodes"])
    bad = round(block["invalid_action_rate"] * turns)
    low, high = wilson_interval(bad, turns)
    return f"{bad}/{turns} = {block['invalid_action_rate']:.1%} [{low:.1%}, {high:.1%}]"


def first_call_wins(root: Path, round_id: str) -> dict[tuple[str, str], int]:
    """(game, level) -> episodes won on their first model call, from data/<round>/eval/episodes.jsonl
    (teacher: the round's start policy with a store; other policies with a store, e.g. eval's drift check,
    and the start policy without one are left out)."""
    start = None if round_id == "base" else load_params(root / "params.yaml").policy_of(round_id)
    wins: dict[tuple[str, str], int] = {}
    for line in (root / "data" / round_id / "eval" / "episodes.jsonl").read_text("utf-8").splitlines():
        ep = json.loads(line)
        with_store = ep["knowledge_store"] is not None
        level = "base" if round_id == "base" else "teacher" if with_store and ep["policy"] == start else \
            "student" if not with_store and ep["policy"] == round_id else "other"
        key = (ep["game"], level)
        wins[key] = wins.get(key, 0) + int(ep["success"] and len(ep["turns"]) == 1)
    return wins


def rows(root: Path) -> list[str]:
    base = json.loads((root / "reports" / "base" / "eval.json").read_text("utf-8"))["heldout"]
    first = first_call_wins(root, "base")
    out = ["| round | game | level | pass rate [95% CI] | passed on call 1 | invalid actions [95% CI] | tokens / turn |",
           "|---|---|---|---|---|---|---|"]
    for details in sorted((root / "reports").glob("r*/eval.json"), key=lambda p: int(p.parent.name[1:])):
        metrics = json.loads(details.read_text("utf-8"))
        first |= first_call_wins(root, details.parent.name)
        for game, student in metrics["heldout"].items():
            if game == "overall":
                continue
            levels = [("base", base[game]), ("teacher", metrics.get("teacher", {}).get("mean", {}).get(game)),
                      ("student", student)]
            out += [f"| {details.parent.name} | {game} | {name} | {rate(b)} | {first.get((game, name), 0)}/"
                    f"{b['episodes']} | {invalid(b)} | "
                    f"{b['response_tokens_per_turn']:.1f} |" for name, b in levels if b]
    return out


def items(root: Path) -> list[str]:
    out = []
    for store in sorted((root / "data").glob("r*/knowledge/stores/*/store-*.md")):
        out.append(f"\n{store.relative_to(root)}:\n")
        out += [f"    {line}" for line in store.read_text("utf-8").splitlines()] or ["    (empty)"]
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/proof/users")
    print("\n".join(rows(folder) + items(folder)))

"""Placebo control for reports/cpu-proof.md section 4: how much of a teacher's lift is *any* store in context?

    PYTHONPATH=src:scripts .venv/bin/python scripts/probe_placebo_store.py SCRATCH PROOF "- EXPERIENCE ITEM: ..."

SCRATCH is a project left by scripts/probe_extract_prompt.py (its r1 store is overwritten with the given text);
PROOF the finished proof whose base eval it is paired with. Plays eval's teacher level (base + store 0 on the
held-out users, eval's seeds and sampling) and prints the pass count, the paired comparison with the base
(exact McNemar, scripts/proof_table.py) and tokens per turn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from proof_table import paired

from oel.config import load_params
from oel.paths import ProjectPaths
from oel.stages import evaluate


def main(root: Path, proof: Path, text: str) -> None:
    (root / "data/r1/knowledge/stores/users/store-0.md").write_text(text + "\n")
    params, paths = load_params(root / "params.yaml"), ProjectPaths(root).round("r1")
    teacher = evaluate.load_teacher(params, paths)
    played = evaluate.play_heldout(teacher, params, paths, "base", evaluate.teacher_knowledge(params, paths))
    episodes = [json.loads(ep.model_dump_json()) for ep in played]
    base = [json.loads(line) for line in (proof / "data/base/eval/episodes.jsonl").read_text().splitlines()]
    turns = [t for ep in episodes for t in ep["turns"]]
    print(f"store {text!r}: {sum(ep['success'] for ep in episodes)}/{len(episodes)}")  # noqa: T201
    print("| base -> placebo teacher |", paired(base, episodes), "|")  # noqa: T201
    print(f"tokens/turn {sum(t['response_tokens'] for t in turns) / len(turns):.1f}")  # noqa: T201


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])

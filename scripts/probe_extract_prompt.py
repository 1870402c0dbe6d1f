"""Probe behind reports/cpu-proof.md section 4: does the extraction prompt decide what the model writes?

    PYTHONPATH=src .venv/bin/python scripts/probe_extract_prompt.py .cache/proof/users-0.5b .cache/probe [CHAT_TEMPLATE]

Reruns a finished proof's r1 extraction in a scratch project (same trajectories, base model, params and
sampling seeds) with the GAME prompt (`Round{k}_Input/Output` transcript, prompts/extract.md) instead of the
conversation view the users game gets — or, given CHAT_TEMPLATE, with the conversation view read by that file
in place of prompts/extract_chat.md (a candidate chat prompt) — consolidates it, plays eval's teacher level (base + store 0 on the
held-out users, eval's seeds and sampling) and prints the paired comparisons with the proof's base and r1
teacher (exact McNemar, scripts/proof_table.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from proof_table import paired

from oel.config import load_params
from oel.paths import ProjectPaths
from oel.stages import consolidate, evaluate, extract
from oel.transcripts import render_transcript, template_version


def scratch(proof: Path, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    (root / "data" / "r1").mkdir(parents=True)
    (root / ".cache").mkdir()
    (root / ".cache" / "models").symlink_to((proof / ".cache" / "models").resolve())
    for name in ("params.yaml", "data/r1/trajectories.jsonl", ".cache/cpu-dtype.json"):
        if (proof / name).exists():
            shutil.copy(proof / name, root / name)
    shutil.copytree(proof / "models" / "base", root / "models" / "base")


def main(proof: Path, root: Path, chat_template: Path | None = None) -> None:
    scratch(proof, root)
    params, paths = load_params(root / "params.yaml"), ProjectPaths(root).round("r1")
    if chat_template is None:
        extract.study_text = lambda ep, version: (render_transcript(ep), template_version(ep, version))
    else:
        import oel.transcripts

        real = oel.transcripts.template
        text = chat_template.read_text()
        oel.transcripts.template = lambda name: text if name == "extract_chat.md" else real(name)
    extract.run(params, paths)
    consolidate.run(params, paths)
    teacher = evaluate.load_teacher(params, paths)
    played = evaluate.play_heldout(teacher, params, paths, "base", evaluate.teacher_knowledge(params, paths))
    episodes = [json.loads(ep.model_dump_json()) for ep in played]
    base = [json.loads(line) for line in (proof / "data/base/eval/episodes.jsonl").read_text().splitlines()]
    r1 = [json.loads(line) for line in (proof / "data/r1/eval/episodes.jsonl").read_text().splitlines()]
    conversation = [ep for ep in r1 if ep["policy"] == "base" and ep["knowledge_store"] == 0]
    items = [json.loads(line)["text"] for line in paths.items.read_text().splitlines()]
    probe = "game-prompt" if chat_template is None else f"{chat_template.name}"
    out = [*(f"item: {text}" for text in items),
           f"{probe} teacher: {sum(ep['success'] for ep in episodes)}/{len(episodes)}",
           "| A -> B | paired seeds | passed A only | passed B only | change | exact McNemar p |",
           f"| base -> {probe} teacher | {paired(base, episodes)} |",
           f"| conversation-prompt teacher -> {probe} teacher | {paired(conversation, episodes)} |"]
    print("\n".join(out))  # noqa: T201 - a script's output


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)

"""A simulated-users round end to end on the tiny random model: collect, extract (the model, then a file),
consolidate, distill, eval; deterministic per seed, held-out users disjoint from the collected ones."""

from __future__ import annotations

from pathlib import Path

import yaml

from oel.artifacts import read_jsonl
from oel.paths import ProjectPaths
from oel.schemas import DistillRow, Episode, KnowledgeItem
from oel.stages import collect, consolidate, distill, evaluate, extract
from oel.stages._common import stage_main
from tests.conftest import tiny_params

USERS_ONLY = {"frozenlake": {"enabled": False}, "sokoban": {"enabled": False}, "textworld": {"enabled": False},
              "users": {"enabled": True, "max_turns": 2}}


def write_params(root: Path, **extract_over) -> Path:
    params = tiny_params(games=USERS_ONLY, eval={"ood": False}, extract={"stores": 1, "steps": 1, **extract_over})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return path


def users_of(episodes: list[Episode]) -> set[str]:
    return {ep.turns[0].context["transcript"] for ep in episodes}


def test_users_round_end_to_end(project: Path, tiny_model_dir: Path):
    params_file = write_params(project)
    paths = ProjectPaths(project).round("r1")
    stage_main("collect", collect.run, "r1", params_file, project, track=False)
    first = paths.trajectories.read_bytes()
    stage_main("collect", collect.run, "r1", params_file, project, track=False)
    assert paths.trajectories.read_bytes() == first  # deterministic per seed
    played = read_jsonl(paths.trajectories, Episode)
    assert {ep.game for ep in played} == {"users"} and {ep.split for ep in played} == {"user", "extract"}
    assert all(1 <= len(ep.turns) <= 2 and ep.feedback.split(":")[0] in ("Success", "Failure") for ep in played)

    stage_main("extract", extract.run, "r1", params_file, project, track=False)  # tiny model: junk or nothing
    stage_main("consolidate", consolidate.run, "r1", params_file, project, track=False)
    assert paths.store("users", 0).is_file()
    summary = stage_main("distill", distill.run, "r1", params_file, project, track=False)
    assert summary["steps_run"] == 2
    metrics = stage_main("eval", evaluate.run, "r1", params_file, project, track=False)
    assert metrics["heldout"]["users"]["episodes"] == 2 and metrics["teacher"]["mean"]["users"]["episodes"] == 2
    heldout = [ep for ep in read_jsonl(paths.eval_episodes, Episode) if ep.knowledge_store is None]
    assert {ep.seed for ep in heldout}.isdisjoint({ep.seed for ep in played})
    assert users_of(heldout).isdisjoint(users_of(played))  # different people, not only different seeds


def test_users_round_with_knowledge_from_a_file(project: Path, tiny_model_dir: Path):
    """extract.source: file on the users game: no extractor, the file's items are the store the teacher sees."""
    (project / "rules.md").write_text("- End every reply with a question to the user.\n", encoding="utf-8")
    params_file = write_params(project, source="file", knowledge_file="rules.md")
    paths = ProjectPaths(project).round("r1")
    stage_main("collect", collect.run, "r1", params_file, project, track=False)
    summary = stage_main("extract", extract.run, "r1", params_file, project, track=False)
    assert summary["source"] == "file" and summary["responses"] == 0
    (item,) = read_jsonl(paths.items, KnowledgeItem)
    assert item.text == "End every reply with a question to the user."
    stage_main("consolidate", consolidate.run, "r1", params_file, project, track=False)
    assert "question to the user" in paths.store("users", 0).read_text("utf-8")
    rows = read_jsonl(paths.distill_rows, DistillRow)
    assert rows and all("question to the user" in row.teacher_prompt[-1].content for row in rows)
    assert not any("question to the user" in row.prompt[-1].content for row in rows)

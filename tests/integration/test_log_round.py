"""A round on a chat log, end to end on the tiny model, in process: import (check + put the log where the
round declares it) -> collect -> extract -> consolidate -> distill -> eval (the consolidation gap), then the
report and the MLflow rows. tests/e2e/test_log_round_dvc.py runs the same round under `dvc repro`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import yaml

from oel.artifacts import read_json, read_jsonl
from oel.chatlog import CHAT_GAME
from oel.paths import ProjectPaths
from oel.schemas import DistillRow, Episode
from oel.stages import collect, consolidate, distill, evaluate, extract
from oel.stages._common import stage_main
from tests.conftest import REPO

PARAMS = {
    "model": {"name": "tiny-random"},
    "rounds": {"r1": {"from": "base", "collect": {"source": "chatlog", "chatlog": "chatlogs/week1.jsonl"}}},
    "collect": {"import_heldout_fraction": 0.25},
    "extract": {"stores": 2, "steps": 2, "max_knowledge_tokens": 64, "max_item_tokens": 32, "prefill_marker": True,
                "sampling": {"max_new_tokens": 12}},
    "consolidate": {"max_rows": 8},
    "distill": {"steps": 2, "batch_size": 2, "save_every": 1, "top_k": 8, "learning_rate": 0.05,
                "sampling": {"max_new_tokens": 6}},
    "eval": {"batch_size": 4, "gap_prompts": 4, "ood_max_new_tokens": 4, "sampling": {"max_new_tokens": 6}},
}


def test_a_log_round_runs_end_to_end_on_the_tiny_model(project):
    log = project / "chat.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_chat_logs.py"), "--out", str(log), "--n", "24",
                    "--seed", "3"], check=True, capture_output=True)
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(PARAMS))
    assert collect.import_file(log, "r1", params_file, project) == (24, project / "chatlogs" / "week1.jsonl")
    stage_main("collect", collect.run, "r1", params_file, project)
    paths = ProjectPaths(project).round("r1")
    episodes = read_jsonl(paths.trajectories, Episode)
    held = {ep.episode_id for ep in episodes if ep.split == "heldout"}
    assert held and len(held) < len(episodes)

    stage_main("extract", extract.run, "r1", params_file, project)
    items = [json.loads(line) for line in paths.items.read_text().splitlines()]
    assert {item["game"] for item in items} <= {CHAT_GAME}
    assert not {item["source_episode"] for item in items} & held  # the extractor never reads held-out logs

    summary = stage_main("consolidate", consolidate.run, "r1", params_file, project)
    rows = read_jsonl(paths.distill_rows, DistillRow)
    assert summary["teacher_system"] == len(rows) == 8 and not {r.episode_id for r in rows} & held
    for row in rows:  # a partial rollout cut before an assistant turn; the teacher has the store in its system
        assert row.prompt[-1].role in ("user", "tool") and row.game == CHAT_GAME
        assert row.teacher_prompt[1:] == row.prompt[1:] or row.teacher_prompt[1:] == row.prompt
        assert "Experience you have learned" in row.teacher_prompt[0].content

    stage_main("distill", distill.run, "r1", params_file, project)
    metrics = stage_main("eval", evaluate.run, "r1", params_file, project)
    gap = metrics["gap"]
    assert gap["prompts"] == 4 and gap["stores"] == 2 and gap["start_policy"] == "base"
    for when in ("start", "after"):
        assert gap[when]["kl_mean"] >= 0 and math.isfinite(gap[when]["kl_mean"])
        assert gap[when]["kl_ci_low"] <= gap[when]["kl_mean"] <= gap[when]["kl_ci_high"]
        assert 1 <= gap[when]["response_tokens_mean"] <= 6
    assert math.isclose(gap["reduction_mean"], gap["start"]["kl_mean"] - gap["after"]["kl_mean"], abs_tol=1e-9)
    assert gap["start"]["kl_mean"] > 0  # knowledge in the system message moves the teacher's distribution
    assert "flag" in metrics["ood"] and "instruction_pass" in metrics["ood_start"]
    assert read_json(paths.details)["gap"]["prompts"] == 4
    assert set(read_json(paths.metrics_file("chat"))) >= {"gap_start", "gap_after", "gap_reduction"}
    per_row = [json.loads(line) for line in (paths.eval_dir / "gap.jsonl").read_text().splitlines()]
    assert len(per_row) == 4 and all(r["row_id"].split("/")[0] in held for r in per_row)

    from oel.rounds.report import write_report

    md = write_report(params_file, project).read_text()
    assert "## Rounds on chat logs" in md and "consolidation gap" in md

    import mlflow

    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["oel"], filter_string="tags.mlflow.runName = 'eval@r1'")
    assert len(runs) == 1 and "metrics.gap/reduction_mean" in runs.columns

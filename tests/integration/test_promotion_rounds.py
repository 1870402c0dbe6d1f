"""Issue 15's done-when: three rounds on the tiny model, round 2 forced to regress.

Every stage runs for real, in process (the DVC/Prefect path of a round is covered by tests/e2e); rounds are
declared by oel.rounds.plan and gated by the real oel.promotion gate on the real MLflow store. Only the gate's
input numbers are forced (a 135M-parameter random model solves nothing, so nothing could regress): r1 and r3
solve 2/2 held-out games, r2 solves 0/2. Expected: r2 is kept back, r3 starts from r1, the registry holds
three versions (@champion r3, @challenger r2), and the report says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oel import promotion, rounds
from oel.artifacts import read_json, write_json
from oel.config import load_params
from oel.metrics import OVERALL, wilson_interval
from oel.paths import ProjectPaths
from oel.stages import collect, consolidate, distill, evaluate, extract
from oel.stages._common import stage_main
from tests.conftest import tiny_params

STAGES = [("collect", collect), ("extract", extract), ("consolidate", consolidate), ("distill", distill),
          ("eval", evaluate)]


def write_params(root: Path) -> Path:
    # One game, one store, one training step: the rounds' wiring is under test, not their quality.
    raw = tiny_params(games={"sokoban": {"enabled": False}, "textworld": {"enabled": False}},
                      extract={"stores": 1, "steps": 1}, distill={"steps": 1}, eval={"ood": False}).model_dump(
        mode="json", by_alias=True)
    raw["rounds"] = {"r1": {"from": "base"}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def force_pass(root: Path, round_id: str, passed: int) -> None:
    """The test hook: rewrite the gate's input (reports/<r>/eval.json) as if `passed` of the games were won."""
    path = ProjectPaths(root).round(round_id).details
    metrics = read_json(path)
    for game, block in metrics["heldout"].items():
        n = block["episodes"]
        low, high = wilson_interval(passed, n)
        block.update(passed=passed, pass_rate=passed / n, pass_ci_low=low, pass_ci_high=high)
        assert game in ("frozenlake", OVERALL)
    write_json(path, metrics)


def run_round(params_file: Path, root: Path, passed: int) -> dict:
    picked = rounds.plan(params_file)
    for name, module in STAGES:
        stage_main(name, module.run, picked.round_id, params_file, root)
    force_pass(root, picked.round_id, passed)
    return promotion.promote(load_params(params_file), root, picked.round_id)


@pytest.mark.slow
def test_a_regressed_round_is_kept_back_and_the_next_starts_from_the_champion(project):
    import mlflow
    import mlflow.genai

    from oel.registry import MODEL_NAME, aliases_in_registry
    from oel.report import write_report

    params_file = write_params(project)
    stage_main("eval", evaluate.run, "base", params_file, project)

    first = run_round(params_file, project, passed=2)
    assert (first["decision"], first["champion_after"]) == ("champion", "r1")
    second = run_round(params_file, project, passed=0)
    assert (second["decision"], second["champion_after"]) == ("challenger", "r1")
    assert "kept back: frozenlake 0.0% vs r1's 100.0%" in second["reason"]
    third = run_round(params_file, project, passed=2)

    params = load_params(params_file)
    assert params.policy_of("r2") == "r1" and params.policy_of("r3") == "r1"  # not from r2, the regressed round
    assert read_json(project / "models" / "r3" / "policy.json")["parent"] == "../r1"
    assert read_json(project / "models" / "r3" / "train_summary.json")["from"] == "r1"
    assert (third["decision"], third["champion_before"], third["champion_after"]) == ("champion", "r1", "r3")

    client = mlflow.MlflowClient()
    versions = {v.tags["oel.round"]: v for v in client.search_model_versions(f"name='{MODEL_NAME}'")}
    assert sorted(versions) == ["r1", "r2", "r3"]
    assert versions["r3"].tags["oel.parent"] == "r1" and versions["r2"].tags["oel.gate.decision"] == "challenger"
    assert len(versions["r1"].tags["oel.params_hash"]) == 12 and versions["r1"].tags["oel.eval.pass_rate"] == "1.0000"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").tags["oel.round"] == "r3"
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").tags["oel.round"] == "r2"
    assert aliases_in_registry(params) == promotion.aliases(params, project) == {"r3": "champion", "r2": "challenger"}
    artifacts = {a.path for a in client.list_artifacts(versions["r1"].run_id, "policy")}
    assert {"policy/policy.json", "policy/adapter"} <= artifacts  # the version's source: adapter + manifest
    knowledge = mlflow.genai.load_prompt("prompts:/oel-knowledge-frozenlake@champion")
    assert knowledge.tags["oel.round"] == "r3" and "store 0" in knowledge.template
    assert mlflow.genai.load_prompt("prompts:/oel-knowledge-frozenlake@r1").version == 1
    run = mlflow.get_run(versions["r2"].run_id)
    assert run.data.tags["oel.gate.decision"] == "challenger" and "kept back" in run.data.tags["oel.gate.reason"]

    # Teacher drift: r3's teacher (r1 + r3's stores) next to the previous round's teacher (base + the same stores).
    drift = read_json(project / "reports" / "r3" / "eval.json")["teacher_drift"]
    assert drift["previous"] == "base" and set(drift["by_game"]) == {"frozenlake", OVERALL}
    assert "eval_teacher_drift" in mlflow.get_run(versions["r3"].run_id).data.metrics

    summary = write_report(params_file, project).read_text()
    assert "## Teacher drift" in summary and "| r3 | frozenlake |" in summary
    assert "| r2 | r1 | challenger | challenger | kept back: frozenlake 0.0% vs r1's 100.0%" in summary
    assert "| r1 | base | champion | — | promoted" in summary and "| r3 | r1 | champion | champion | promoted" in summary
    assert "Next round: r4, from r3." in summary
    listing = promotion.rounds_table(params, project).splitlines()
    assert [line.split()[:4] for line in listing[1:4]] == [["r1", "base", "—", "champion"],
                                                           ["r2", "r1", "challenger", "challenger"],
                                                           ["r3", "r1", "champion", "champion"]]
    assert listing[-1] == "next round: r4, from r3"

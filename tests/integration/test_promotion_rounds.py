"""Issue 15's done-when: three rounds on the tiny model, round 2 forced to regress.

Every stage runs for real, in process (the DVC/Prefect path of a round is covered by tests/e2e); rounds are
declared by oel.rounds.plan, gated by the real gate (oel.rounds) and mirrored into the real MLflow registry. Only
the gate's input is forced (a tiny random model plays nothing differently round to round): r2's held-out games
are rewritten as if every turn's move were invalid, a regression in the invalid-action rate at a tied pass
rate. Expected: r2 is kept back naming that metric, r3 starts from r1, the registry holds three versions
(@champion r3, @challenger r2), the report says why, and a rollback moves @champion back to r1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oel import rounds
from oel.artifacts import iter_jsonl, read_json, write_jsonl
from oel.config import load_params
from oel.paths import ProjectPaths
from oel.rounds import lifecycle
from oel.rounds.registry import register_round
from oel.schemas import Episode
from oel.stages import collect, consolidate, distill, evaluate, extract, headroom
from oel.stages._common import stage_main
from tests.conftest import tiny_params

STAGES = [("collect", collect), ("extract", extract), ("consolidate", consolidate), ("headroom", headroom),
          ("distill", distill), ("eval", evaluate)]


def write_params(root: Path) -> Path:
    # One game, one store, one training step: the rounds' wiring is under test, not their quality.
    raw = tiny_params(games={"sokoban": {"enabled": False}, "textworld": {"enabled": False}},
                      extract={"stores": 1, "steps": 1}, distill={"steps": 1, "require_headroom": False},
                      headroom={"episodes_per_game": 2}, eval={"ood": False}).model_dump(
        mode="json", by_alias=True)
    raw["rounds"] = {"r1": {"from": "base"}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def shape(root: Path, round_id: str, valid: bool) -> None:
    """The test hook: the policy's own held-out games (the gate's input) rewritten so that every move is valid
    (or invalid) and every reply 5 tokens long: a tiny random model's games differ by chance, not by round."""
    path = ProjectPaths(root).round(round_id).eval_episodes
    episodes = [ep.model_copy(update={"turns": [t.model_copy(update={"valid": valid, "response_tokens": 5})
                                                for t in ep.turns]})
                if ep.policy == round_id and ep.knowledge_store is None else ep for ep in iter_jsonl(path, Episode)]
    write_jsonl(path, episodes)


def run_round(params_file: Path, root: Path, regress: bool = False):
    picked = rounds.plan(params_file)
    for name, module in STAGES:
        stage_main(name, module.run, picked.round_id, params_file, root)
    shape(root, picked.round_id, valid=not regress)
    params = load_params(params_file)
    decision = lifecycle.promote(params, root, picked.round_id)
    register_round(params, root, decision)
    return decision


@pytest.mark.slow
def test_a_regressed_round_is_kept_back_and_the_next_starts_from_the_champion(project):
    import mlflow
    import mlflow.genai

    from oel.rounds.registry import MODEL_NAME, aliases_in_registry
    from oel.rounds.report import write_report

    params_file = write_params(project)
    stage_main("eval", evaluate.run, "base", params_file, project)
    shape(project, "base", valid=True)

    first = run_round(params_file, project)
    assert (first.decision, first.champion_after) == ("champion", "r1")
    second = run_round(params_file, project, regress=True)
    assert (second.decision, second.champion_after) == ("challenger", "r1")
    assert second.blocked_by == ["frozenlake invalid_action_rate"]
    assert "kept back: frozenlake invalid_action_rate 100.0% vs r1's 0.0%" in second.reason
    third = run_round(params_file, project)

    params = load_params(params_file)
    assert params.policy_of("r2") == "r1" and params.policy_of("r3") == "r1"  # not from r2, the regressed round
    assert read_json(project / "models" / "r3" / "policy.json")["parent"] == "../r1"
    assert read_json(project / "models" / "r3" / "train_summary.json")["from"] == "r1"
    assert (third.decision, third.champion_before, third.champion_after) == ("champion", "r1", "r3")

    client = mlflow.MlflowClient()
    versions = {v.tags["oel.round"]: v for v in client.search_model_versions(f"name='{MODEL_NAME}'")}
    assert sorted(versions) == ["r1", "r2", "r3"]
    assert versions["r3"].tags["oel.parent"] == "r1" and versions["r2"].tags["oel.gate.decision"] == "challenger"
    assert versions["r2"].tags["oel.gate.blocked_by"] == "frozenlake invalid_action_rate"
    assert len(versions["r1"].tags["oel.params_hash"]) == 12
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").tags["oel.round"] == "r2"
    artifacts = {a.path for a in client.list_artifacts(versions["r1"].run_id, "policy")}
    assert {"policy/policy.json", "policy/adapter"} <= artifacts  # the version's source: adapter + manifest
    assert mlflow.genai.load_prompt("prompts:/oel-knowledge-frozenlake@r1").version == 1
    run = mlflow.get_run(versions["r2"].run_id)
    assert run.data.tags["oel.gate.decision"] == "challenger" and "kept back" in run.data.tags["oel.gate.reason"]

    assert aliases_in_registry(params) == lifecycle.aliases(params, project) == {"r3": "champion", "r2": "challenger"}
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").tags["oel.round"] == "r3"
    summary = write_report(params_file, project).read_text()
    assert "## Teacher drift" in summary and "## Headroom before training" in summary
    assert "| r2 | r1 | yes | challenger | challenger | kept back: frozenlake invalid_action_rate 100.0%" in summary
    assert "| r2 | r1 | frozenlake | invalid_action_rate | **blocks** |" in summary
    listing = lifecycle.rounds_table(params, project).splitlines()
    assert [line.split()[:2] for line in listing[1:4]] == [["r1", "base"], ["r2", "r1"], ["r3", "r1"]]

    # A rollback moves @champion back, in the decision files and in the registry.
    back = lifecycle.rollback(params, project, "users complained")
    register_round(params, project, back)
    assert lifecycle.champion(params, project) == "r1"
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").tags["oel.round"] == "r1"
    assert "rollback of r3: champion r3 → r1" in write_report(params_file, project).read_text()


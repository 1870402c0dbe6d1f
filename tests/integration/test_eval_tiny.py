"""The eval stage end to end on the tiny random model: base round, round r1 with stores, the report,
and MLflow (stage run + iteration run) in a temp project."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from oel.artifacts import read_json, read_jsonl
from oel.metrics import OVERALL
from oel.models import write_policy
from oel.paths import ProjectPaths
from oel.schemas import Episode, PolicyManifest
from oel.stages import evaluate
from oel.stages._common import stage_main
from tests.conftest import tiny_params

PNG = b"\x89PNG\r\n\x1a\n"


def write_params(root: Path) -> Path:
    params = tiny_params(games={"textworld": {"enabled": False}})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return path


def test_eval_base_then_r1_then_report(project: Path, tiny_model_dir: Path):
    params_file = write_params(project)
    base = stage_main("eval", evaluate.run, "base", params_file, project)
    p = ProjectPaths(project)
    assert read_json(p.round("base").details) == base
    assert base["heldout"][OVERALL]["episodes"] == 4               # 2 held-out seeds x 2 games
    assert 0.0 <= base["ood"]["instruction_pass"] <= 1.0
    assert math.isfinite(base["ood"]["loglik_nats_per_token"]) and base["ood"]["loglik_nats_per_token"] < 0

    write_policy(p.policy_dir("r1"), PolicyManifest(model="tiny-random", round="r1"))
    r1 = p.round("r1")
    for game in ("frozenlake", "sokoban"):  # stores are per game: every enabled game has its own
        r1.store(game, 0).parent.mkdir(parents=True)
        r1.store(game, 0).write_text(f"- EXPERIENCE ITEM: move right, then down in {game}.\n", encoding="utf-8")
    metrics = stage_main("eval", evaluate.run, "r1", params_file, project)

    assert metrics["teacher"]["store_0"][OVERALL]["episodes"] == 4
    assert metrics["teacher"]["store_0"]["sokoban"]["episodes"] == 2
    assert "teacher_plain" in metrics and OVERALL in metrics["headroom"]
    episodes = read_jsonl(r1.eval_episodes, Episode)
    assert {ep.knowledge_store for ep in episodes} == {None, 0}
    assert all(t.response_tokens > 0 for ep in episodes for t in ep.turns)
    for round_id in ("base", "r1"):
        for name in ("rounds.png", "levels.png"):
            assert (p.round(round_id).plots / name).read_bytes().startswith(PNG)
    assert [row["round"] for row in read_json(r1.plots / "curve.json")] == ["base", "r1"]

    from oel.rounds.report import write_report

    md = write_report(params_file, project).read_text(encoding="utf-8")
    assert "| r1 | base |" in md and "move right, then down in sokoban." in md
    assert (project / "reports" / "summary.html").is_file()
    _assert_logged_to_mlflow(params_file)


def _assert_logged_to_mlflow(params_file: Path) -> None:
    import mlflow

    from oel.config import load_params
    from oel.tracking import _mlflow

    _mlflow(load_params(params_file))
    runs = mlflow.search_runs(experiment_names=["oel"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert "heldout/overall/pass_rate" in by_name["eval@r1"].data.metrics   # the stage run
    iteration = by_name["iteration r1"].data.metrics                              # the round's parent run
    assert {"eval_pass_rate", "eval_teacher_pass_rate", "eval_headroom", "eval_ood_instruction_pass"} <= set(iteration)


def test_ood_model_calls_on_tiny_model(tiny_model):
    from oel.ood.lm import greedy_answers, mean_loglik
    from oel.rollout import TransformersBackend

    backend = TransformersBackend(tiny_model)
    questions = ["Say hi.", "Count to three in words.", "Name a colour."]
    first = greedy_answers(backend, questions, max_new_tokens=6, batch_size=2)
    assert len(first) == 3 and first == greedy_answers(backend, questions, max_new_tokens=6, batch_size=2)
    ll = mean_loglik(backend, ["The cat sat on the mat.", "Rain fell all night on the quiet town."])
    # A random model over a ~49k vocabulary sits near -ln(49152) ~ -10.8 nats/token.
    assert -20.0 < ll < 0.0

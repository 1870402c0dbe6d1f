"""oel-iteration under prefect_test_harness, over the real dvc.yaml with stand-in stage commands:
round picking and declaring, one visible task per stage in order, failure and retry behaviour."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.e2e.conftest import use_standins

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(clone, harness) -> Path:
    root = clone({"r1": "base"})
    use_standins(root)
    return root


def task_runs(flow_run_id) -> dict[str, int]:
    """Task run name -> run_count (attempts) of one flow run, in start order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    runs = sorted(asyncio.run(read()), key=lambda r: r.expected_start_time)
    return {r.name: r.run_count for r in runs}


def artifacts(key: str) -> list:
    """Every version of one Prefect artifact, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                               sort=ArtifactSort.CREATED_DESC)

    return list(reversed(asyncio.run(read())))


def iteration_run(root: Path, round_id: str):
    """The round's MLflow parent run in the clone's store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("oel")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`oel.iteration` = '{round_id}'")
    return run


def test_iteration_runs_the_pending_round_then_the_loop_declares_the_next(project):
    from flows.oel_iteration import oel_iteration
    from flows.oel_loop import oel_loop

    params = project / "params.yaml"
    params.write_text("# keep me: a user comment\n" + params.read_text())
    state = oel_iteration(params_file=str(params), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == "r1"
    assert list(task_runs(state.state_details.flow_run_id)) == [
        "plan", "base", "eval_base", "collect@r1", "extract@r1", "consolidate@r1", "headroom@r1", "distill@r1", "eval@r1",
        "record@r1", "promote@r1"]

    # The round's MLflow run spans the round: open before the first stage wrote anything, closed after the last.
    run = iteration_run(project, "r1")
    first = (project / "models" / "base" / "policy.json").stat().st_mtime * 1000
    last = (project / "reports" / "r1" / "eval.json").stat().st_mtime * 1000
    assert run.info.status == "FINISHED"
    assert run.info.start_time <= first and last <= run.info.end_time

    # oel-loop runs the next iteration: every declared round is done, so it declares r2 from r1.
    state = oel_loop(rounds=1, params_file=str(params), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == ["r2"]
    text = params.read_text()
    assert text.startswith("# keep me: a user comment\n")
    assert "  r2:\n    from: r1\n" in text
    assert '"parent": "../r1"' in (project / "models" / "r2" / "policy.json").read_text()

    # Each round's report rows (with its MLflow run link) and knowledge items are Prefect artifacts; one key
    # per project, so r1 and r2 are two versions of each.
    reports, knowledge = artifacts("oel-round-report"), artifacts("oel-round-knowledge")
    assert [a.type for a in reports] == ["markdown"] * 2 and [a.type for a in knowledge] == ["table"] * 2
    for round_id, report in zip(("r1", "r2"), reports, strict=True):
        run = iteration_run(project, round_id)
        assert f"# OEL round {round_id}" in report.data and f"/runs/{run.info.run_id})" in report.data
        assert f"| {round_id} | frozenlake |" in report.data
    (item,) = json.loads(knowledge[-1].data) if isinstance(knowledge[-1].data, str) else knowledge[-1].data
    assert item["text"] == "go right first" and item["game"] == "frozenlake" and item["store"] == 0


def test_user_error_in_a_stage_fails_the_flow_without_retry(project, monkeypatch):
    from flows.oel_iteration import oel_iteration

    monkeypatch.setenv("OEL_STANDIN_FAIL", "distill:user")
    state = oel_iteration(params_file=str(project / "params.yaml"), return_state=True)
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert "distill@r1 failed: error: stand-in distill failed on purpose" in str(err)
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["distill@r1"] == 1 and "eval@r1" not in runs
    assert not (project / "reports" / "r1" / "eval.json").exists()
    assert iteration_run(project, "r1").info.status == "FAILED"  # the round's run ends with its status


def test_transient_failure_is_retried_once(project, monkeypatch, tmp_path):
    from flows.oel_iteration import oel_iteration

    monkeypatch.setenv("OEL_STANDIN_FAIL", "collect:once")
    monkeypatch.setenv("OEL_STANDIN_MARKER", str(tmp_path / "failed-once"))
    state = oel_iteration(params_file=str(project / "params.yaml"), return_state=True)
    assert state.is_completed(), state.message
    assert task_runs(state.state_details.flow_run_id)["collect@r1"] == 2

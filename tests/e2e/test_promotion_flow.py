"""The promotion gate through the real flow (issue 15): oel-loop runs three rounds over the real dvc.yaml with
stand-in stages, round 2's stand-in eval solves nothing, and the flow's own gate keeps it back, so r3 is
declared from r1 in params.yaml (DVC's graph: models/r1 is what r3 depends on) and the registry agrees."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import use_standins

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_loop_starts_round_3_from_round_1_when_round_2_regressed(clone, harness, monkeypatch):
    import mlflow
    import yaml
    from flows.oel_loop import oel_loop

    from oel.rounds.registry import MODEL_NAME

    root = clone({"r1": "base"})
    use_standins(root)
    monkeypatch.setenv("OEL_STANDIN_REGRESS", "r2")
    state = oel_loop(rounds=3, params_file=str(root / "params.yaml"), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == ["r1", "r2", "r3"]

    declared = yaml.safe_load((root / "params.yaml").read_text())["rounds"]
    assert declared == {"r1": {"from": "base"}, "r2": {"from": "r1"}, "r3": {"from": "r1"}}
    assert '"parent": "../r1"' in (root / "models" / "r3" / "policy.json").read_text()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "models/r1" in {d["path"] for d in lock["distill@r3"]["deps"]}  # DVC's graph: r3 rests on r1
    assert "models/r2" not in {d["path"] for d in lock["distill@r3"]["deps"]}

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    versions = {v.tags["oel.round"]: v.tags["oel.gate.decision"] for v in client.search_model_versions(
        f"name='{MODEL_NAME}'")}
    assert versions == {"r1": "champion", "r2": "challenger", "r3": "champion"}
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").tags["oel.round"] == "r3"
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").tags["oel.round"] == "r2"

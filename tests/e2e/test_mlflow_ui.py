"""The MLflow UI (as `make ui` starts it), rendered by headless Chromium: two iterations side by side on its
run-compare page (the README's screenshot), the experiment opening on its runs, the episodes' traces and a
stage run's datasets. Runs, traces and datasets are written through oel.tracking, as the stages write them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from oel.paths import ProjectPaths
from tests.conftest import REPO, tiny_params
from tests.e2e.conftest import BIN, free_port

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def iterations(tmp_path, monkeypatch):
    """Two iteration runs with headline metrics and nested stage runs, in tmp_path/mlruns/mlflow.db."""
    from oel import tracking

    monkeypatch.chdir(tmp_path)
    params = tiny_params(tracking={"uri": "sqlite:///mlruns/mlflow.db", "experiment": "oel", "traces": "all"},
                         rounds={"r1": {"from": "base"}, "r2": {"from": "r1"}})
    ids = []
    for i, round_id in enumerate(("r1", "r2")):
        with tracking.stage_run("eval", round_id, params):
            tracking.log_metrics({"pass_rate": 0.2 + 0.1 * i})
            # A played episode as the stages trace it, and the stage's output as a dataset.
            tracking.log_episode_traces(params, "eval", [episode(round_id)], (time.time_ns(), time.time_ns()))
            rp = ProjectPaths(tmp_path).round(round_id)
            rp.eval_episodes.parent.mkdir(parents=True)
            rp.eval_episodes.write_text(episode(round_id).model_dump_json() + "\n")
            tracking.log_datasets("eval", params, rp)
        tracking.log_to_iteration(params, round_id, {"pass_rate": 0.2 + 0.1 * i})
        ids.append(tracking.iteration_run_id(params, round_id))
    import mlflow

    return ids, mlflow.get_experiment_by_name("oel").experiment_id


def episode(round_id: str):
    from oel.schemas import Episode, Message, Turn

    turn = Turn(index=0, prompt=[Message(role="user", content="You are on a frozen lake.")], response="[right]",
                action="right", valid=True, observation="You reached the goal.", response_tokens=3)
    return Episode(episode_id=f"{round_id}-heldout-frozenlake-7", game="frozenlake", seed=7, split="heldout",
                   round=round_id, policy=round_id, turns=[turn], success=True, reward=1.0, feedback="Success")


def chromium(tmp_path, page: str, *args: str, until: str | None = None) -> str:
    """Headless Chromium on `page`: the DOM (grown virtual-time budgets until `until` shows) or, with
    --screenshot, the PNG written."""
    # The pages render only once their JS has had (virtual) time to run; a busy 2-core machine may need
    # more than the 15 s that suffice when idle, so the budget grows before the test gives up.
    for budget_ms in (15_000, 30_000, 60_000):
        out = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--virtual-time-budget={budget_ms}",
                              f"--user-data-dir={tmp_path / 'chrome'}", *args, page],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        if until is None or until in out.stdout:
            break
    return out.stdout


@pytest.fixture
def ui(tmp_path):
    port = free_port()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "PATH": f"{BIN}:/usr/bin:/bin"}
    # The same flags as `make ui`.
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", "sqlite:///mlruns/mlflow.db",
                             "--default-artifact-root", "./mlruns/artifacts", "-w", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not healthy(url):
            assert proc.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server not healthy after 90 s"
            time.sleep(1)
        yield url
    finally:
        proc.terminate()  # the parent takes its uvicorn worker down with it
        proc.wait(timeout=30)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it: apt-get install chromium)")
def test_compare_page_shows_both_iterations(iterations, ui, tmp_path):
    ids, experiment_id = iterations
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([experiment_id])})
    page = f"{ui}/#/compare-runs?{query}"
    dom = chromium(tmp_path, page, "--dump-dom", until="Comparing 2 Runs")
    assert "Comparing 2 Runs" in dom
    assert "iteration r1" in dom and "iteration r2" in dom
    # The README's "compare iterations" picture is this page (OEL_SCREENSHOTS=1 refreshes docs/img/).
    shot = tmp_path / "compare-iterations.png"
    chromium(tmp_path, page, "--window-size=1400,900", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
    if os.environ.get("OEL_SCREENSHOTS"):
        (REPO / "docs" / "img").mkdir(exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "img" / "compare-iterations.png")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it: apt-get install chromium)")
def test_experiment_opens_on_its_runs_and_shows_traces_and_datasets(iterations, ui, tmp_path):
    ids, experiment_id = iterations
    # MLflow 3.17 picks an experiment's page from its "Model training" / "GenAI" switch (the URL's workflowType,
    # else the browser's last choice, GenAI at first): the link the README and `make ui` give sets it.
    dom = chromium(tmp_path, f"{ui}/#/experiments/{experiment_id}?workflowType=machine_learning", "--dump-dom",
                   until="iteration r2")
    assert "iteration r1" in dom and "iteration r2" in dom  # the runs table, not the GenAI overview
    # Traces list each episode's trace under its session (the episode id).
    dom = chromium(tmp_path, f"{ui}/#/experiments/{experiment_id}/traces", "--dump-dom",
                   until="chat-sessions/r2-heldout-frozenlake-7")
    assert "chat-sessions/r1-heldout-frozenlake-7" in dom and "chat-sessions/r2-heldout-frozenlake-7" in dom
    import mlflow

    (stage,) = mlflow.search_runs([experiment_id], filter_string="attributes.run_name = 'eval@r1'",
                                  output_format="list")
    # The stage run's Datasets: eval's output folder by path and DVC md5 (a folder's md5 ends in .dir).
    from oel.tracking import dvc_md5

    dom = chromium(tmp_path, f"{ui}/#/experiments/{experiment_id}/runs/{stage.info.run_id}", "--dump-dom",
                   until="data/r1/eval (")
    assert f"data/r1/eval ({dvc_md5(tmp_path / 'data' / 'r1' / 'eval')})" in dom

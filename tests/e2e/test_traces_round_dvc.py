"""A round from traffic under DVC: `rounds.r1.collect: {source: traces, experiment, since, until}` in params.yaml,
`dvc repro collect@r1` reads the gateway's traces of that window (recorded by the gateway's own recorder, as in
tests/integration/test_traces_round.py) into the project's store, and `dvc status` is clean after. Later traffic
and late feedback leave a forced rerun byte-identical; a new window is a changed param DVC sees."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.e2e.conftest import run
from tests.e2e.test_dvc_pipeline import ran
from tests.e2e.test_log_round_dvc import set_params
from tests.integration.test_traces_round import DEPLOY, Gateway, a, u

pytestmark = pytest.mark.e2e


def on_traces(since, until) -> dict:
    # Strings: yaml.safe_dump quotes them, as params.yaml must (DVC cannot track an unquoted YAML timestamp).
    return {"from": "base", "collect": {"source": "traces", "experiment": DEPLOY, "since": since.isoformat(),
                                        "until": until.isoformat()}}


def test_a_traces_round_runs_under_dvc_repro_and_leaves_status_clean(clone):
    root = clone({"r1": "base"})
    gw = Gateway(root)
    start = gw.now()
    first = gw.chat([u("Reach me at ada@example.com")], "Noted.")
    gw.chat([u("Reach me at ada@example.com"), a("Noted."), u("Thanks!")], "You're welcome.", stream=True)
    gw.feedback(first, True)
    until = gw.now()
    set_params(root, rounds={"r1": on_traces(start, until)})
    assert f"until: '{until.isoformat()}'" in (root / "params.yaml").read_text()

    done = run(["dvc", "repro", "collect@r1"], root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "collect@r1" in ran(done.stdout)
    trajectories = root / "data" / "r1" / "trajectories.jsonl"
    (row,) = [json.loads(line) for line in trajectories.read_text().splitlines()]
    assert row["episode_id"] == first and len(row["trace_ids"]) == 2 and "ada@example.com" not in json.dumps(row)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["collect@r1"]
    assert lock["params"]["params.yaml"]["rounds.r1"]["collect"]["experiment"] == DEPLOY

    status = run(["dvc", "status", "collect@r1", "--json"], root)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    assert ran(run(["dvc", "repro", "collect@r1"], root).stdout) == set()

    # Traffic after `until` and feedback given late: the same window reads the same bytes.
    before = trajectories.read_bytes()
    gw.chat([u("Reach me at ada@example.com"), a("Noted."), u("Thanks!"), a("You're welcome."), u("Bye")], "Bye!")
    gw.feedback(first, False, "changed my mind")
    gw.now()
    forced = run(["dvc", "repro", "--force", "collect@r1"], root)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert trajectories.read_bytes() == before
    assert json.loads(run(["dvc", "status", "collect@r1", "--json"], root).stdout) == {}

    # The next snapshot is a new window in params: DVC sees collect@r1's params changed.
    set_params(root, rounds={"r1": on_traces(start, gw.now())})
    assert set(json.loads(run(["dvc", "status", "--json"], root).stdout)) >= {"collect@r1"}

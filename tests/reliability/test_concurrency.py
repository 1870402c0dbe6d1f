"""Two `oel-iteration` runs triggered at once in one project: the iteration lock (oel.rounds) serialises them.
Two real processes race through the flow's own critical section (lock -> plan/declare -> stages -> metrics),
released by one shared go-file. tests/unit/test_rounds.py proves the lock primitive itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from oel.config import load_params
from tests.reliability.conftest import env

ITERATION = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from oel import rounds
    from oel.paths import ProjectPaths

    root, timeout, work = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    print("ready", flush=True)
    while not (root / "go").exists():
        time.sleep(0.002)
    try:
        with rounds.iteration_lock(root, timeout):      # what flows.oel_iteration holds around a round
            plan = rounds.plan(root / "params.yaml")    # picks or declares the round
            time.sleep(work)                            # stand-in for the five stage targets
            metrics = ProjectPaths(root).round(plan.round_id).details
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text(json.dumps({"pid": os.getpid()}))
    except rounds.IterationBusy as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(plan.round_id, os.getpid())
""")


def race(root: Path, timeout: float, work: float) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-c", ITERATION, str(root), str(timeout), str(work)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for _ in range(2)]
    for proc in procs:  # both interpreters up (imports done) and polling for the go-file
        assert proc.stdout.readline().strip() == "ready"
    (root / "go").touch()
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


@pytest.fixture
def root(tmp_path) -> Path:
    # The lock is under test, not the promotion gate: every round is promoted, as before the gate.
    (tmp_path / "params.yaml").write_text("seed: 1\npromotion: {policy: always}\nrounds:\n  r1:\n    from: base\n")
    return tmp_path


def test_second_iteration_waits_then_runs_the_next_round(root):
    results = race(root, timeout=60, work=1.0)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-1000:] for r in results]
    ran = sorted(r.stdout.split()[0] for r in results)
    assert ran == ["r1", "r2"]  # never both on r1
    assert list(load_params(root / "params.yaml").rounds) == ["r1", "r2"]
    assert (root / "params.yaml").read_text().count("r2:") == 1
    for rid in ("r1", "r2"):
        assert (root / "reports" / rid / "eval.json").is_file()


def test_second_iteration_fails_with_one_line_and_touches_nothing(root):
    results = race(root, timeout=0.5, work=4.0)
    winners = [r for r in results if r.returncode == 0]
    losers = [r for r in results if r.returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [r.stderr[-1000:] for r in results]
    assert winners[0].stdout.split()[0] == "r1"
    err = losers[0].stderr.strip()
    assert losers[0].returncode == 2 and "\n" not in err
    holder_pid = winners[0].stdout.split()[1]
    assert err.startswith("error: another oel iteration is running") and f"pid {holder_pid}" in err
    assert list(load_params(root / "params.yaml").rounds) == ["r1"]  # the loser declared nothing
    assert not (root / "reports" / "r2").exists()

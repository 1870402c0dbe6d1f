"""`dvc repro` in a fresh clone: the real stages run two rounds end to end, round 2 starts from round 1,
every stage run is nested under its MLflow iteration run, and a second repro does nothing. The
invalidation rules (distill.* reruns distill + eval only; `dvc exp run -S`) run on stand-in stages."""

from __future__ import annotations

import json
import sqlite3

import pytest
import yaml

from oel.config import STAGES
from tests.e2e.conftest import git, run, use_standins

pytestmark = pytest.mark.e2e


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_runs_two_rounds_then_is_up_to_date(clone):
    root = clone({"r1": "base", "r2": "r1"})
    first = run(["dvc", "repro"], root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert ran(first.stdout) == {"base", "eval_base"} | {f"{s}@{r}" for s in STAGES for r in ("r1", "r2")}
    assert json.loads((root / "models" / "r2" / "policy.json").read_text())["parent"] == "../r1"
    for r in ("base", "r1", "r2"):
        assert json.loads((root / "reports" / r / "eval.json").read_text())
        assert {p.name for p in (root / "metrics" / r).iterdir()} == {"frozenlake.json", "sokoban.json"}

    again = run(["dvc", "repro"], root)
    assert again.returncode == 0 and ran(again.stdout) == set()
    assert "Data and pipelines are up to date." in again.stdout

    nested = stage_runs_by_parent(root)
    for r in ("r1", "r2"):
        assert nested[f"iteration {r}"] >= {f"{s}@{r}" for s in STAGES}


def stage_runs_by_parent(root) -> dict[str, set[str]]:
    """MLflow runs in the clone's sqlite store: parent run name -> names of runs nested under it."""
    db = sqlite3.connect(root / "mlruns" / "mlflow.db")
    rows = db.execute("""
        SELECT parent.name, child.name FROM runs child
        JOIN tags t ON t.run_uuid = child.run_uuid AND t.key = 'mlflow.parentRunId'
        JOIN runs parent ON parent.run_uuid = t.value""").fetchall()
    out: dict[str, set[str]] = {}
    for parent, child in rows:
        out.setdefault(parent, set()).add(child)
    return out


def test_distill_params_rerun_distill_and_eval_only_and_exp_run_works(clone):
    root = clone({"r1": "base"})
    use_standins(root)
    assert run(["dvc", "repro"], root).returncode == 0
    params = (root / "params.yaml").read_text()

    raw = yaml.safe_load(params)
    raw["distill"]["steps"] += 3
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    rerun = run(["dvc", "repro"], root)
    assert rerun.returncode == 0, rerun.stderr
    assert ran(rerun.stdout) == {"distill@r1", "eval@r1"}

    (root / "params.yaml").write_text(params)
    exp = run(["dvc", "exp", "run", "-S", "distill.steps=3"], root)
    assert exp.returncode == 0, exp.stdout + exp.stderr
    assert ran(exp.stdout) == {"distill@r1", "eval@r1"}
    assert "distill.steps" in run(["dvc", "params", "diff"], root).stdout


def test_a_profile_default_reruns_exactly_the_stages_that_read_it(clone):
    root = clone({"r1": "base"})
    use_standins(root)
    assert run(["dvc", "repro"], root).returncode == 0
    profiles = root / "src" / "oel" / "profiles.yaml"
    text = profiles.read_text()

    def changed_after(old: str, new: str) -> set[str]:
        assert old in text
        profiles.write_text(text.replace(old, new, 1))
        status = run(["dvc", "status", "--json"], root)
        assert status.returncode == 0, status.stderr
        return set(json.loads(status.stdout))

    # The selected profile (cpu): its eval section is read by both evals and nothing else.
    assert changed_after("  eval: {episodes_per_game:", "  eval: {ood_max_new_tokens: 32, episodes_per_game:") == {
        "eval_base", "eval@r1"}
    # A profile the params do not select changes nothing.
    assert changed_after("gpu:\n  model: *gpu_model", "gpu:\n  model: {<<: *gpu_model, revision: main}") == set()
    # Selecting another profile reruns every stage.
    profiles.write_text(text)
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("profile: cpu", "profile: gpu"))
    status = run(["dvc", "status", "--json"], root)
    assert set(json.loads(status.stdout)) == {"base", "eval_base"} | {f"{s}@r1" for s in STAGES}


WIDTH = 80


def fits(output: str) -> list[str]:
    """The table's lines, after checking each fits the terminal width the metrics were designed for."""
    lines = output.splitlines()
    assert lines and all(len(line) <= WIDTH for line in lines), "\n".join(lines)
    return lines


def test_metrics_read_in_80_columns_and_plots_are_native(clone):
    """Issue 18: one short `dvc metrics show` row per game and round (three games, two rounds and base:
    the stand-in eval writes every game), `dvc metrics diff` of two revisions in 80 columns, and
    `dvc plots show` / `dvc plots diff` render the Vega-Lite curves of curve.json."""
    root = clone({"r1": "base", "r2": "r1"})
    use_standins(root)
    assert run(["dvc", "repro"], root).returncode == 0
    git(root, "add", "dvc.lock")
    git(root, "commit", "-qm", "two rounds")

    show = run(["dvc", "metrics", "show"], root)
    assert show.returncode == 0, show.stderr
    lines = fits(show.stdout.strip())
    assert lines[0].split() == ["Path", "gain", "invalid", "pass", "teacher", "tokens"]
    assert {line.split()[0] for line in lines[1:]} == {
        f"metrics/{r}/{name}.json" for r in ("base", "r1", "r2") for name in ("frozenlake", "sokoban", "textworld", "ood")}

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["distill"]["steps"] += 3   # the stand-in eval's numbers follow the distill params
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run(["dvc", "repro"], root).returncode == 0
    diff = run(["dvc", "metrics", "diff", "HEAD"], root)
    assert diff.returncode == 0, diff.stderr
    lines = fits(diff.stdout.strip())
    assert lines[0].split() == ["Path", "Metric", "HEAD", "workspace", "Change"]
    changed = {tuple(line.split()[:2]) for line in lines[1:]}
    assert ("metrics/r2/textworld.json", "pass") in changed and ("metrics/base/sokoban.json", "pass") not in changed

    for cmd in (["dvc", "plots", "show", "-o", "shown"], ["dvc", "plots", "diff", "HEAD", "-o", "diffed"]):
        plots = run(cmd, root)
        assert plots.returncode == 0, plots.stdout + plots.stderr
        html = (root / cmd[-1] / "index.html").read_text()
        for field in ("reports/r2/plots/curve.json", "hconcat", '"pass_rate"', '"response_tokens_per_turn"'):
            assert field in html, (cmd, field)
    assert '"rev": "HEAD"' in (root / "diffed" / "index.html").read_text()   # both revisions are drawn

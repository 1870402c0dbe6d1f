"""The house's layering, checked by import-linter against .importlinter: the CLI and flows above the round
lifecycle (oel.rounds), the lifecycle above the stages, no import cycle between siblings anywhere in oel, and
MLflow touched by oel.tracking only. The second test shows the contract failing on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: grimp must read this tree's modules, not the installed (editable) oel.
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"}
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", str(root / ".importlinter")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layering_contract_holds():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_a_stage_importing_the_round_lifecycle_breaks_it(tmp_path: Path):
    for part in ("src", "flows"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    stage = tmp_path / "src" / "oel" / "stages" / "evaluate.py"
    stage.write_text(stage.read_text() + "\n\ndef _champion():\n    from oel.rounds.lifecycle import champion\n"
                     "    return champion\n")
    done = lint(tmp_path)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "oel.stages.evaluate -> oel.rounds.lifecycle" in done.stdout
    assert "Contracts: 2 kept, 1 broken." in done.stdout

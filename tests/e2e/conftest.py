"""A throw-away clone of the project: tracked + untracked-not-ignored files in a fresh git repo, tiny
params, the shared model / TextWorld caches linked in, every tool's state inside the clone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params

BIN = Path(sys.executable).parent
SHARED_CACHES = ("models", "textworld")  # rebuildable and slow to build: share them with the repo


def tiny_raw(rounds: dict[str, str]) -> dict:
    """tiny_params() as a params.yaml mapping, with the given {round: from} chain."""
    # Orchestration is under test, not the games: skip TextWorld generation and the OOD probe (the
    # slowest parts of a tiny round on 2 cores); the stages' own tests cover them.
    raw = tiny_params(games={"textworld": {"enabled": False}}, eval={"ood": False}).model_dump(
        mode="json", by_alias=True)
    raw["rounds"] = {rid: {"from": src} for rid, src in rounds.items()}
    return raw


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=oel-test", "-c", "user.email=oel@test", *args], cwd=root,
                   check=True, capture_output=True)


def make_clone(root: Path, rounds: dict[str, str]) -> Path:
    for rel in project_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw(rounds), sort_keys=False))
    for name in SHARED_CACHES:
        (REPO / ".cache" / name).mkdir(parents=True, exist_ok=True)
        (root / ".cache").mkdir(exist_ok=True)
        (root / ".cache" / name).symlink_to(REPO / ".cache" / name)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "clone")
    return root


def clone_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(root / ".prefect"),
               OEL_RETRY_DELAY_S="1", PYTHONPATH=str(root))
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture
def clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: clone(rounds={"r1": "base"}) -> project root; env points every tool into it."""

    def _make(rounds: dict[str, str]) -> Path:
        root = make_clone(tmp_path / "proj", rounds)
        for key, value in clone_env(root).items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        return root

    return _make


def run(cmd: list[str], root: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                          env=clone_env(root))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_standins(root: Path) -> None:
    """Point every dvc.yaml stage at tests/e2e/standin.py; deps, params and outs stay the real ones."""
    text = (root / "dvc.yaml").read_text()
    standin = f"{sys.executable} tests/e2e/standin.py"
    for stage in ("collect", "extract", "consolidate", "headroom", "distill", "eval"):
        text = text.replace(f"cmd: oel {stage} --round ${{key}}", f"cmd: {standin} {stage} ${{key}}")
    text = text.replace("cmd: oel base", f"cmd: {standin} base base")
    text = text.replace("cmd: oel eval --round base", f"cmd: {standin} eval base")
    assert "cmd: oel" not in text
    (root / "dvc.yaml").write_text(text)
    git(root, "commit", "-qam", "stand-in stages")

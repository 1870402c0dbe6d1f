"""Fault-injection helpers: temp projects driven through the real `oel` CLI in subprocesses.

A module-scoped `reference` project runs one uninterrupted tiny round (collect -> extract -> consolidate ->
distill -> eval) once; crash tests copy its upstream artifacts into a fresh project, kill one stage with
SIGKILL at a seeded random point (or on a file trigger), rerun it and compare with the reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import MODEL_CACHE, REPO, tiny_params

BIN = Path(sys.executable).parent
# One seed drives every random kill point; CI can vary it (OEL_FAULT_SEED=...) to explore other points.
FAULT_SEED = int(os.environ.get("OEL_FAULT_SEED", "9"))
STAGE_TIMEOUT = 240


def rng(name: str) -> random.Random:
    return random.Random(f"{FAULT_SEED}:{name}")


def reliability_raw(**overrides) -> dict:
    """tiny_params() as params.yaml, trimmed for fault injection: grid games only (TextWorld generation and
    the OOD probe have their own tests), one held-out episode per game, 4 distill steps, a checkpoint per step."""
    base = {"games": {"textworld": {"enabled": False}},
            "eval": {"ood": False, "with_knowledge": False, "episodes_per_game": 1},
            "distill": {"steps": 4, "save_every": 1}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return tiny_params(**base).model_dump(mode="json", by_alias=True)


def make_project(root: Path, raw: dict | None = None, store: bool = True) -> Path:
    """A project folder with params.yaml and the shared model cache; store: an empty MLflow store already in
    mlruns/mlflow.db, as any project has after its first stage."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw or reliability_raw(), sort_keys=False))
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (root / ".cache").mkdir(exist_ok=True)
    link = root / ".cache" / "models"
    if not link.exists():
        link.symlink_to(MODEL_CACHE)
    if store and not (root / "mlruns" / "mlflow.db").exists():
        (root / "mlruns").mkdir(exist_ok=True)
        shutil.copy2(_empty_store(), root / "mlruns" / "mlflow.db")
    return root


@functools.cache
def _empty_store() -> Path:
    """An MLflow SQLite store with its schema and nothing else, made once per test process: a command on a
    fresh project spends about 2 s of its 4 creating that schema (reports/bench.md), and the fault matrices run
    dozens of such commands, none of which is about the schema."""
    import tempfile

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="oel-empty-mlflow-"))
    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()).engine.dispose()
    return folder / "mlflow.db"


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(PATH=f"{BIN}{os.pathsep}{out.get('PATH', '')}", OEL_NO_GIT_TAGS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra)
    out.pop("PREFECT_API_URL", None)
    return out


def oel(root: Path, *args: str, timeout: float = STAGE_TIMEOUT, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "oel"), *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                          env=env(HF_HOME=str(root / ".cache" / "huggingface"), **extra_env))


def stage(root: Path, name: str, round_id: str = "r1", *more: str, **extra_env: str) -> subprocess.CompletedProcess:
    return oel(root, name, "--round", round_id, "--params", "params.yaml", *more, **extra_env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def one_error_line(proc: subprocess.CompletedProcess, *needles: str, strict: bool = True) -> str:
    """The user path's contract: exit 2, no traceback, and the error as ONE line `error: ...` naming the cause.

    strict: stderr is that line and nothing else (errors found before any work starts). Not strict: for errors
    found mid-stage, the stage's own progress log precedes it; the error is still the single, last line."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{proc.stderr[-3000:]}"
    if strict:
        assert lines == errors, f"more than the error line on stderr:\n{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return errors[0]


@dataclass
class Killed:
    returncode: int
    stderr: str
    seconds: float
    trigger: str = ""


def kill_stage(root: Path, name: str, *, after_s: float | None = None,
               when: Callable[[], str | None] | None = None, on_stderr: Callable[[str], str | None] | None = None,
               poll_s: float = 0.01, round_id: str = "r1", kill: bool = True) -> Killed:
    """Start `oel <name>` and SIGKILL it after `after_s` s, or as soon as `when()` / `on_stderr(text)` gives a reason
    (kill=False: only fire the trigger, e.g. to stop a server, and wait for the stage to end on its own)."""
    errlog = root / f".{name}-killed.stderr"
    with errlog.open("w") as fh:
        proc = subprocess.Popen([str(BIN / "oel"), name, "--round", round_id, "--params", "params.yaml"], cwd=root,
                                stdout=subprocess.DEVNULL, stderr=fh, env=env(HF_HOME=str(root / ".cache" / "huggingface")))
        start = time.monotonic()
        trigger = ""
        try:
            while proc.poll() is None and time.monotonic() - start < STAGE_TIMEOUT:
                if after_s is not None and time.monotonic() - start >= after_s:
                    trigger = f"timer {after_s:.2f}s"
                    break
                if when is not None and (reason := when()):
                    trigger = reason
                    break
                if on_stderr is not None and (reason := on_stderr(errlog.read_text())):
                    trigger = reason
                    if kill:
                        break
                    on_stderr = None  # the trigger was a side effect (a fault elsewhere): let the stage run on
                time.sleep(poll_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    return Killed(proc.returncode, errlog.read_text(), time.monotonic() - start, trigger)


def tree_hashes(root: Path, *tops: str) -> dict[str, str]:
    """sha256 of every file under the given top folders (the artifacts a bad input must not touch)."""
    out = {}
    for top in tops:
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


ARTIFACT_TOPS = ("data", "models", "reports", "checkpoints")


@dataclass
class Reference:
    """One uninterrupted tiny round, and how long each stage took (kill points scale with it)."""

    root: Path
    seconds: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)

    def seed_project(self, dest: Path, upto: str) -> Path:
        """A fresh project holding the reference's artifacts of every stage before `upto` (and its MLflow db)."""
        make_project(dest, store=False)  # the reference's own store is copied below
        shutil.copy2(self.root / "params.yaml", dest / "params.yaml")
        keep = {"collect": [], "extract": ["data/r1/trajectories.jsonl"],
                "distill": ["data/r1/trajectories.jsonl", "data/r1/knowledge", "data/r1/distill.jsonl"],
                "eval": ["data/r1/trajectories.jsonl", "data/r1/knowledge", "data/r1/distill.jsonl", "models"]}[upto]
        for rel in ["mlruns", *keep]:
            src = self.root / rel
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dest / rel) if src.is_dir() else shutil.copy2(src, dest / rel)
        return dest


LOADED = "Loading weights: 100%"  # transformers' progress line once the policy is in memory


@pytest.fixture(scope="package")
def reference(tmp_path_factory) -> Reference:
    ref = Reference(make_project(tmp_path_factory.mktemp("reference") / "proj"))
    for name in ("collect", "extract", "consolidate", "distill", "eval"):
        # Timed from the moment the model is loaded: start-up cost varies (first MLflow db migration, imports).
        errlog = ref.root / f".{name}.stderr"
        loaded_at = None
        start = time.monotonic()
        with errlog.open("w") as fh:
            proc = subprocess.Popen([str(BIN / "oel"), name, "--round", "r1", "--params", "params.yaml"],
                                    cwd=ref.root, stdout=subprocess.DEVNULL, stderr=fh,
                                    env=env(HF_HOME=str(ref.root / ".cache" / "huggingface")))
            while proc.poll() is None:
                if loaded_at is None and LOADED in errlog.read_text():
                    loaded_at = time.monotonic()
                time.sleep(0.01)
        stderr = errlog.read_text()
        assert proc.returncode == 0, f"reference {name} failed:\n{stderr[-4000:]}"
        ref.seconds[name] = time.monotonic() - (loaded_at or start)
        ref.summaries[name] = stderr
    return ref


def kill_midway(root: Path, name: str, reference: Reference, reset: Callable[[], None], attempts: int = 3) -> Killed:
    """SIGKILL `oel <name>` at a seeded moment of its work. On a loaded 2-core box the stage may finish before
    that moment; then its outputs are reset and the kill is retried at half the delay (same seed)."""
    for attempt in range(attempts):
        killed = kill_stage(root, name, on_stderr=kill_point(name, reference, scale=0.5 ** attempt))
        if killed.returncode == -9:
            return killed
        reset()
    raise AssertionError(f"{name} finished before every kill point ({attempts} tries)")


def kill_point(name: str, reference: Reference, low: float = 0.05, high: float = 0.6, scale: float = 1.0):
    """Trigger: a seeded random moment of the stage's work, counted from its model load (as in the reference)."""
    delay = rng(name).uniform(low, high) * reference.seconds[name] * scale
    seen: list[float] = []

    def check(stderr: str) -> str | None:
        if not seen:
            if LOADED not in stderr:
                return None
            seen.append(time.monotonic())
        return f"{delay:.2f}s after model load" if time.monotonic() - seen[0] >= delay else None
    return check

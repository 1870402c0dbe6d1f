"""Shared fixtures: tiny params, a temp project root, MLflow in tmp, the tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oel.config import Params, parse_params
from oel.env import setup_env

REPO = Path(__file__).resolve().parents[1]
# Built models are cached in the repo's .cache so every test (and test process) reuses one conversion.
MODEL_CACHE = REPO / ".cache" / "models"

setup_env(REPO)
# Each test names its own project (a tmp cwd, or the root it passes a stage): a relative tracking store must not
# resolve into the repo, nor into the project of a test that ran earlier in this worker (see reset_project_root).
del os.environ["OEL_PROJECT_ROOT"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OEL_NO_GIT_TAGS", "1")
# Under pytest-xdist (`make test` runs 2 workers) each worker and the processes it starts get their share of the
# cores: two torch processes with a thread per core each oversubscribe 2 cores and spin (the 135M demo ran 3x
# slower). Set before torch is imported; subprocesses inherit it.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
# Prefect's ephemeral API server (collect's Dask shards) gets 20 s to start by default; two busy workers on
# 2 cores can take longer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def tiny_params(**overrides) -> Params:
    """Smallest useful config: tiny model, 2 episodes per game, one round."""
    raw = {
        # float32, not the cpu profile's measured `auto`: tests compare numbers at fp32 tolerances.
        "model": {"name": "tiny-random", "dtype": "float32"},
        # All games on (the cpu profile plays FrozenLake only); every teacher store played.
        "games": {"sokoban": {"enabled": True}, "textworld": {"enabled": True, "max_turns": 3}},
        # A nested section replaces its whole default, so extraction_sampling spells out the validate-mode values.
        "collect": {"episodes_per_game": 2, "extraction_episodes_per_game": 1, "batch_size": 4,
                    "sampling": {"max_new_tokens": 8},
                    "extraction_sampling": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 8}},
        # The paper's unprimed format; tests/unit/test_extract.py covers prefill_marker on its own.
        "extract": {"stores": 2, "steps": 2, "max_knowledge_tokens": 64, "max_item_tokens": 32, "prefill_marker": False,
                    "sampling": {"max_new_tokens": 16}},
        "headroom": {"episodes_per_game": 2, "batch_size": 4, "sampling": {"max_new_tokens": 8}},
        "distill": {"steps": 2, "batch_size": 2, "save_every": 1, "top_k": 8,
                    "sampling": {"max_new_tokens": 6}},
        # The teacher level on (the cpu profile leaves it off), every store played.
        "eval": {"episodes_per_game": 2, "batch_size": 4, "ood_max_new_tokens": 8, "with_knowledge": True, "teacher_stores": 0,
                 "sampling": {"max_new_tokens": 8}},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_params(raw, "tiny")


@pytest.fixture(autouse=True)
def reset_project_root():
    """Stages run in-process call setup_env(root), which records the root for the whole process."""
    yield
    os.environ.pop("OEL_PROJECT_ROOT", None)


@pytest.fixture
def params() -> Params:
    return tiny_params()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp project root (cwd) whose .cache/models links to the shared model cache."""
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "models").symlink_to(MODEL_CACHE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from oel.models.embedded import ensure_embedded

    return ensure_embedded("tiny-random", MODEL_CACHE)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from oel.models import load_model

    return load_model(str(tiny_model_dir))

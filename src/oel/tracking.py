"""MLflow, and only here: one parent run per round ("iteration r1"), one nested run per stage call.

Stages run in separate processes (DVC), so the parent is found by tag, not by an active-run stack.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oel.config import Params

log = logging.getLogger(__name__)

# Which params sections each stage reads (also what dvc.yaml lists for it).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "collect": ("seed", "model", "games", "collect"),
    "extract": ("seed", "model", "games", "extract"),
    "consolidate": ("seed", "extract", "consolidate"),
    "distill": ("seed", "model", "distill"),
    "eval": ("seed", "model", "games", "eval"),
}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def _sections(params: Params, names: tuple[str, ...]) -> dict[str, Any]:
    dumped = params.model_dump(mode="json", by_alias=True)
    return flatten({name: dumped[name] for name in names})


def _mlflow(params: Params):
    import mlflow

    uri = params.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(params.tracking.experiment) is None:
        artifacts = Path("mlruns/artifacts").resolve().as_uri() if uri.startswith("sqlite") else None
        try:
            mlflow.create_experiment(params.tracking.experiment, artifact_location=artifacts)
        except Exception:  # another process created it first
            pass
    mlflow.set_experiment(params.tracking.experiment)
    return mlflow


def iteration_run_id(params: Params, round_id: str) -> str:
    """The round's parent run, created on first use."""
    mlflow = _mlflow(params)
    exp = mlflow.get_experiment_by_name(params.tracking.experiment)
    found = mlflow.search_runs([exp.experiment_id], output_format="list",
                               filter_string=f"tags.`oel.iteration` = '{round_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(exp.experiment_id, run_name=f"iteration {round_id}",
                            tags={"oel.iteration": round_id, "oel.round": round_id, **_git_tags()})
    client.log_batch(run.info.run_id, params=_as_params(_sections(params, ("seed", "model", "games"))))
    if round_id in params.rounds:
        client.log_param(run.info.run_id, "from", params.policy_of(round_id))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def stage_run(stage: str, round_id: str, params: Params) -> Iterator[Any]:
    """Open `<stage>@<round>` nested under the round's iteration run; yields the mlflow module."""
    mlflow = _mlflow(params)
    parent = iteration_run_id(params, round_id)
    with mlflow.start_run(run_name=f"{stage}@{round_id}", parent_run_id=parent,
                          tags={"oel.stage": stage, "oel.round": round_id, **_git_tags()}):
        mlflow.log_params(_as_params(_sections(params, STAGE_SECTIONS.get(stage, ()))))
        yield mlflow


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if clean and mlflow.active_run() is not None:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    if mlflow.active_run() is not None and Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_to_iteration(params: Params, round_id: str, metrics: Mapping[str, float],
                     artifacts: list[Path] = (), artifact_path: str | None = None) -> None:
    """Headline numbers onto the round's parent run, so iterations compare side by side in the UI."""
    mlflow = _mlflow(params)
    client = mlflow.MlflowClient()
    run_id = iteration_run_id(params, round_id)
    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    for key, value in clean.items():
        client.log_metric(run_id, key, value)
    for path in artifacts:
        if Path(path).exists():
            if Path(path).is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
            else:
                client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def _as_params(flat: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:500] for k, v in flat.items()}


def _git_tags() -> dict[str, str]:
    if os.environ.get("OEL_NO_GIT_TAGS"):
        return {}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return {"oel.git_sha": sha} if sha else {}

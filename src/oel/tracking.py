"""MLflow, and only here: one parent run per round ("iteration r1"), one nested run per stage call.

Stages run in separate processes (DVC), so the parent is found by tag, not by an active-run stack.
The parent spans its round: `oel-iteration` opens it when the round starts and ends it with the round's
status; under a plain `dvc repro` it is created by the first stage and ends with the latest one.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oel.config import Params
from oel.errors import UserError
from oel.provenance import flatten

log = logging.getLogger(__name__)

# Which params sections each stage reads (also what dvc.yaml lists for it, from params.yaml and, for every
# section but profile and seed, from the selected profile in oel/profiles.yaml).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "collect": ("profile", "seed", "model", "generation", "games", "collect"),
    "extract": ("profile", "seed", "model", "generation", "games", "extract"),
    "consolidate": ("profile", "seed", "games", "extract", "consolidate"),
    "headroom": ("profile", "seed", "model", "generation", "games", "headroom"),
    "distill": ("profile", "seed", "model", "generation", "distill"),
    "eval": ("profile", "seed", "model", "generation", "games", "eval"),
}


def _sections(params: Params, names: tuple[str, ...]) -> dict[str, Any]:
    dumped = params.model_dump(mode="json", by_alias=True)
    return flatten({name: dumped[name] for name in names})


EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI's experiment type tag: which tab an experiment opens on


def resolve_uri(uri: str, root: str | Path | None = None) -> str:
    """A relative SQLite store (sqlite:///mlruns/mlflow.db) lies in the project root, whatever the working
    directory: the root is `root`, else the one oel.env.setup_env recorded for this process (OEL_PROJECT_ROOT),
    else the working directory. Absolute, also because MLflow caches one store (and its pooled connections)
    per URI string."""
    if not uri.startswith("sqlite:///"):
        return uri
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_absolute():
        db = Path(root or os.environ.get("OEL_PROJECT_ROOT") or ".") / db
    return f"sqlite:///{db.resolve()}"


def _mlflow(params: Params):
    import mlflow

    uri, artifacts = resolve_uri(params.tracking.uri), None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (db.parent / "artifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(params.tracking.experiment) is None:
        try:
            # Marked a model-training experiment (runs and charts, where iterations are compared). The 3.17 UI
            # shows that view under its "Model training" switch (URL ?workflowType=machine_learning, README).
            mlflow.create_experiment(params.tracking.experiment, artifact_location=artifacts,
                                     tags={EXPERIMENT_KIND: "custom_model_development"})
        except Exception:  # another process created it first
            pass
    mlflow.set_experiment(params.tracking.experiment)
    return mlflow


OWNER_TAG = "oel.iteration_owner"  # set while a flow holds the round's run open across its stages


def iteration_run_id(params: Params, round_id: str) -> str:
    """The round's parent run, created RUNNING on first use (its start is the round's start)."""
    mlflow = _mlflow(params)
    exp = mlflow.get_experiment_by_name(params.tracking.experiment)
    found = mlflow.search_runs([exp.experiment_id], output_format="list",
                               filter_string=f"tags.`oel.iteration` = '{round_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(exp.experiment_id, run_name=f"iteration {round_id}",
                            tags={"oel.iteration": round_id, "oel.round": round_id, **_git_tags()})
    from mlflow.entities import Param

    flat = _as_params(_sections(params, ("profile", "seed", "model", "games")))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
    if round_id in params.rounds:
        client.log_param(run.info.run_id, "from", params.policy_of(round_id))
    return run.info.run_id


def begin_iteration(params: Params, round_id: str) -> str:
    """A flow starts the round: its run is RUNNING until end_iteration, whatever the stages do meanwhile."""
    with _server_reachable(params):
        client = _mlflow(params).MlflowClient()
        run_id = iteration_run_id(params, round_id)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, OWNER_TAG, "flow")
    return run_id


def end_iteration(params: Params, round_id: str, ok: bool) -> None:
    """The round's run ends now with the round's status (FINISHED or FAILED)."""
    with _server_reachable(params):
        client = _mlflow(params).MlflowClient()
        run_id = iteration_run_id(params, round_id)
        client.delete_tag(run_id, OWNER_TAG)
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def _stage_ended(client: Any, parent: str, ok: bool) -> None:
    """Without a flow (plain `dvc repro`) the round's run ends with its latest stage, so it spans them all."""
    if OWNER_TAG in client.get_run(parent).data.tags:
        return
    client.set_terminated(parent, "FINISHED" if ok else "FAILED")


@contextmanager
def stage_run(stage: str, round_id: str, params: Params) -> Iterator[Any]:
    """Open `<stage>@<round>` nested under the round's iteration run; yields the mlflow module."""
    with _server_reachable(params):
        mlflow = _mlflow(params)
        parent = iteration_run_id(params, round_id)
        client = mlflow.MlflowClient()
        if OWNER_TAG not in client.get_run(parent).data.tags:
            client.update_run(parent, status="RUNNING")
        ok = False
        try:
            with mlflow.start_run(run_name=f"{stage}@{round_id}", parent_run_id=parent,
                                  tags={"oel.stage": stage, "oel.round": round_id, **_git_tags()}):
                mlflow.log_params(_as_params(_sections(params, STAGE_SECTIONS.get(stage, ()))))
                yield mlflow
            ok = True
        finally:
            _stage_ended(client, parent, ok)


class TrackingError(UserError, RuntimeError):
    """The MLflow tracking server named by tracking.uri cannot be reached."""


@contextmanager
def _server_reachable(params: Params) -> Iterator[None]:
    """A tracking server that is down (or goes down mid-stage) would surface as a multi-page MlflowException
    traceback; it becomes one line naming the URI and the fix. Outputs are written
    atomically before/independently of tracking, so whatever a stage finished stays valid; a rerun completes.
    MLflow's own retry budget applies first (MLFLOW_HTTP_REQUEST_MAX_RETRIES / _TIMEOUT)."""
    try:
        yield
    except Exception as err:
        if (problem := _store_failure(err, params.tracking.uri)) is not None:
            raise TrackingError(problem) from None
        reason = _connection_failure(err)
        if reason is None:
            raise
        raise TrackingError(f"MLflow tracking server {params.tracking.uri} is unreachable ({reason}); start it "
                            f"(make ui) or set tracking.uri: sqlite:///mlruns/mlflow.db, then rerun this stage "
                            f"(finished outputs are kept)") from None


@contextmanager
def client(params: Params) -> Iterator[Any]:
    """An MlflowClient on the project's store, for modules beside tracking (the registry); a store that is
    damaged or a server that is down is one line, as in every stage."""
    with _server_reachable(params):
        yield _mlflow(params).MlflowClient()


def _store_failure(err: BaseException, uri: str) -> str | None:
    """An SQLite tracking store that is not a database (random bytes, a copy cut
    short, a disk-full write) would end in a SQLAlchemy traceback: one line naming the file and the fix."""
    import sqlite3

    if not uri.startswith("sqlite:///"):
        return None
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    found = next((e for e in chain if isinstance(e, sqlite3.DatabaseError) or
                  type(e).__name__ == "DatabaseError" or "file is not a database" in str(e)
                  or "database disk image is malformed" in str(e)), None)
    if found is None:
        return None
    db = uri.removeprefix("sqlite:///")
    why = str(getattr(found, "orig", None) or found).strip().splitlines()[0][:120]
    return (f"{db}: the MLflow tracking store is not a usable SQLite database ({why}); move it aside or delete it "
            f"and rerun this stage: a fresh store is created (data/, models/ and reports/ are not touched)")


def _connection_failure(err: BaseException) -> str | None:
    """A short reason when `err` (or what it wraps) is an HTTP connection failure to the tracking server."""
    import re

    import requests
    from mlflow.exceptions import MlflowException

    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, (requests.ConnectionError, requests.Timeout)) or (
                isinstance(e, MlflowException) and "API request to" in str(e) and "failed with exception" in str(e)):
            found = (re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))
                     or re.search(r"(Read timed out|timed out|Max retries exceeded)", str(e)))
            return found.group(1).strip() if found else type(e).__name__
    return None


def recording() -> bool:
    """False only where stage code runs without MLflow: OEL_TRACKING=off (scripts/gpu_check.sh, whose
    record is its own JSON) or mlflow not installed (the check's offline GPU box has torch, transformers,
    peft and accelerate only). mlflow is a dependency everywhere else, so there every call records."""
    import importlib.util

    return os.environ.get("OEL_TRACKING") != "off" and importlib.util.find_spec("mlflow") is not None


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if not recording():
        return
    import mlflow

    clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if clean and mlflow.active_run() is not None:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if not recording():
        return
    import mlflow

    if mlflow.active_run() is not None and Path(path).exists():
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def stage_files(stage: str, paths: Any, start: str) -> dict[str, list[Path]]:
    """The data a stage reads and writes (dvc.yaml's data deps and outs; code deps are not datasets)."""
    from oel.paths import ProjectPaths

    policy, stores = ProjectPaths(paths.root).policy_dir(start), paths.stores
    return {
        "collect": {"input": [policy], "output": [paths.trajectories]},
        "extract": {"input": [paths.trajectories, policy], "output": [paths.items, paths.extract_summary]},
        "consolidate": {"input": [paths.items, paths.trajectories], "output": [stores, paths.distill_rows]},
        "distill": {"input": [paths.distill_rows, stores, policy], "output": [paths.model]},
        "eval": {"input": [paths.model, stores], "output": [paths.eval_dir, paths.details, paths.metrics_dir]},
    }.get(stage, {})


def dvc_md5(path: Path) -> str:
    """DVC 3's md5 of a file (its bytes) or a folder (md5 of its sorted {md5, relpath} list, plus `.dir`)."""
    import hashlib
    import json

    def file_md5(p: Path) -> str:
        digest = hashlib.md5()  # noqa: S324 - DVC's content hash, not security
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    if path.is_file():
        return file_md5(path)
    entries = [{"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()}
               for p in sorted(path.rglob("*")) if p.is_file()]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"  # noqa: S324


def log_datasets(stage: str, params: Params, paths: Any) -> list[str]:
    """The stage's inputs and outputs as MLflow datasets on the active run: the project-relative path is the
    source and the name, DVC's md5 the digest (the run page shows which trajectories, stores, distillation set
    and policy it used and wrote). Missing paths (e.g. no stores yet for eval@base) are skipped."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if mlflow.active_run() is None:
        return []
    start = "base" if paths.round_id == "base" else params.policy_of(paths.round_id)
    datasets, contexts, logged = [], [], []
    for context, files in stage_files(stage, paths, start).items():
        for path in files:
            if not path.exists():
                continue
            rel = path.relative_to(paths.root).as_posix() if path.is_relative_to(paths.root) else str(path)
            with warnings.catch_warnings():  # the "file" and "" schemes register the same local source twice
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(path.resolve().as_uri())
            datasets.append(MetaDataset(source, name=rel, digest=dvc_md5(path)))
            contexts.append(context)
            logged.append(f"{context}:{rel}")
    if datasets:
        mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=[None] * len(datasets))
    return logged


def log_episode_traces(params: Params, stage: str, episodes: Sequence[Any], window: tuple[int, int]) -> int:
    """One MLflow trace per episode (tracking.traces picks which) on the active stage run; call it after the
    stage wrote its outputs. Outside a stage run (a stage's run() called directly) nothing is traced."""
    if not recording():
        return 0
    import mlflow

    if params.tracking.traces == "off" or mlflow.active_run() is None:
        return 0
    from oel import traces

    return traces.log_episodes(mlflow, stage, episodes, window, params.tracking)


def log_extraction_traces(params: Params, round_id: str, calls: Sequence[dict[str, Any]],
                          window: tuple[int, int]) -> int:
    """One MLflow trace per extraction call (see oel.traces.log_extraction_calls), like log_episode_traces."""
    if not recording():
        return 0
    import mlflow

    if params.tracking.traces == "off" or mlflow.active_run() is None:
        return 0
    from oel import traces

    return traces.log_extraction_calls(mlflow, round_id, calls, window, params.tracking)


def log_to_iteration(params: Params, round_id: str, metrics: Mapping[str, float],
                     artifacts: list[Path] = (), artifact_path: str | None = None) -> None:
    """Headline numbers onto the round's parent run, so iterations compare side by side in the UI."""
    if not recording():
        return
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


MAX_ARTIFACT_MB = 200  # a LoRA adapter is a few MB; merged full weights stay in DVC only
SAMPLE_EPISODES = 5


def log_round_artifacts(params: Params, round_id: str, root: str | Path = ".") -> list[str]:
    """Knowledge stores, a trajectory sample, plots, the DVC metrics, eval's breakdown and the policy
    (adapter) onto `iteration <round>`.

    Called once a round's eval is done (the flow's last task). Paths are read from `root`; returns
    the artifact paths logged, so callers can say what was recorded.
    """
    from oel.paths import ProjectPaths

    rp = ProjectPaths(Path(root)).round(round_id)
    client = _mlflow(params).MlflowClient()
    run_id = iteration_run_id(params, round_id)
    logged = [*log_dir(client, run_id, rp.stores, "knowledge/stores"),
              *log_dir(client, run_id, rp.plots, "plots"),
              *log_dir(client, run_id, rp.metrics_dir, "metrics"),
              *log_dir(client, run_id, rp.model, "policy")]
    for path in (rp.extract_summary, rp.details):
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="summaries")
            logged.append(f"summaries/{path.name}")
    if rp.trajectories.is_file():
        with rp.trajectories.open(encoding="utf-8") as fh:
            sample = "".join(line for _, line in zip(range(SAMPLE_EPISODES), fh, strict=False))
        client.log_text(run_id, sample, "trajectories/sample.jsonl")
        logged.append("trajectories/sample.jsonl")
    return logged


def log_dir(client: Any, run_id: str, folder: Path, artifact_path: str) -> list[str]:
    logged: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
        if path.stat().st_size > MAX_ARTIFACT_MB * 2**20:
            log.info("not logging %s to MLflow (> %d MB; it stays a DVC output)", path, MAX_ARTIFACT_MB)
            continue
        sub = path.parent.relative_to(folder).as_posix()
        dest = artifact_path if sub == "." else f"{artifact_path}/{sub}"
        client.log_artifact(run_id, str(path), artifact_path=dest)
        logged.append(f"{dest}/{path.name}")
    return logged


# ---- registries: the Model Registry's versions and aliases, the Prompt Registry (oel.rounds.registry) --------

def registered_model(client: Any, name: str, description: str) -> None:
    """Create the registered model once."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)


def model_aliases(client: Any, name: str, tag: str) -> dict[str, str]:
    """`tag` value of the aliased version (or v<N>) -> alias, as the Model Registry holds them now."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {}
    return {client.get_model_version(name, version).tags.get(tag, f"v{version}"): alias
            for alias, version in model.aliases.items()}


def prompt_version(params: Params, name: str, alias: str) -> int | None:
    """The Prompt Registry's version of `name` under `alias`, or None when there is none."""
    _mlflow(params)
    import mlflow.genai

    try:
        return int(mlflow.genai.load_prompt(f"prompts:/{name}@{alias}").version)
    except Exception:  # no such prompt or alias: MLflow raises a plain MlflowException
        return None


def register_prompt(params: Params, name: str, text: str, message: str, tags: dict[str, str]) -> int:
    _mlflow(params)
    import mlflow.genai

    return int(mlflow.genai.register_prompt(name, text, commit_message=message, tags=tags).version)


def set_prompt_alias(params: Params, name: str, alias: str, version: int) -> None:
    _mlflow(params)
    import mlflow.genai

    mlflow.genai.set_prompt_alias(name, alias, version)


# ---- the AI Gateway that serves the champion (oel.online): its endpoint's routes, feedback on its traces --------

GATEWAY_PROVIDER = "openai"  # both engines speak OpenAI's chat API: the gateway's openai provider with an api_base
GENAI_KIND = "genai_development"  # the experiment-kind tag that opens an experiment on its traces in the UI


class GatewayError(TrackingError):
    """The gateway server refused or could not be reached; one line."""


@contextmanager
def _gateway_call(url: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        first = (str(err.message).strip().splitlines() or [type(err).__name__])[0][:300]
        raise GatewayError(f"MLflow gateway at {url}: {first}") from None
    except Exception as err:
        if (reason := _connection_failure(err)) is None:
            raise
        raise GatewayError(f"MLflow gateway at {url} is unreachable ({reason}); is `oel serve` running?") from None


def _gateway_store(url: str) -> Any:
    # MLflow's own gateway set-up (mlflow.assistant.gateway_connection) goes through the tracking store: the 3.17.2
    # client has no gateway methods. A REST store: the server checks each upstream against its own allowance.
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(url)


def _weight(share: float) -> float:
    # The gateway splits by int(weight * 100); half a percent on top keeps 0.29 from flooring to 28.
    return (round(share * 100) + 0.5) / 100


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def gateway_routes(url: str, endpoint: str) -> dict[str, float]:
    """Model name -> share of requests, as the gateway's endpoint routes now ({} before the endpoint exists)."""
    from mlflow.entities.gateway_endpoint import GatewayModelLinkageType
    from mlflow.exceptions import MlflowException

    with _gateway_call(url):
        try:
            found = _gateway_store(url).get_gateway_endpoint(name=endpoint)
        except MlflowException as err:
            if _not_found(err):
                return {}
            raise
    weights = {m.model_definition.model_name: int(m.weight * 100) for m in found.model_mappings
               if m.linkage_type == GatewayModelLinkageType.PRIMARY and m.model_definition is not None}
    total = sum(weights.values())
    return {name: round(w / total, 2) for name, w in weights.items()} if total else {}


def set_gateway_routes(url: str, endpoint: str, experiment: str, api_base: str, api_key: str,
                       routes: Mapping[str, float]) -> str:
    """Point the endpoint at the engine's models with these shares, every request traced into `experiment`; the
    endpoint, its secret and its model definitions are created on first use. Returns the experiment id.

    One endpoint update replaces every route at once; a request already running keeps the model it was sent to."""
    from mlflow.entities.gateway_endpoint import (
        GatewayEndpointModelConfig,
        GatewayModelLinkageType,
        RoutingStrategy,
    )
    from mlflow.exceptions import MlflowException

    with _gateway_call(url):
        store = _gateway_store(url)
        experiment_id = _experiment_id(url, experiment)
        secret_id = _engine_secret(store, f"{endpoint}-engine", api_base, api_key)
        configs = [GatewayEndpointModelConfig(model_definition_id=_model_definition(store, f"{endpoint}.{name}",
                                                                                    secret_id, name),
                                              linkage_type=GatewayModelLinkageType.PRIMARY, weight=_weight(share))
                   for name, share in routes.items()]
        # A traffic split with one model routes everything to it, so the strategy never changes with the routes.
        split = RoutingStrategy.REQUEST_BASED_TRAFFIC_SPLIT
        try:
            found = store.get_gateway_endpoint(name=endpoint)
        except MlflowException as err:
            if not _not_found(err):
                raise
            store.create_gateway_endpoint(name=endpoint, model_configs=configs, routing_strategy=split,
                                          experiment_id=experiment_id, usage_tracking=True)
        else:
            store.update_gateway_endpoint(found.endpoint_id, model_configs=configs, routing_strategy=split,
                                          experiment_id=experiment_id, usage_tracking=True)
    return experiment_id


def _experiment_id(url: str, name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, tags={EXPERIMENT_KIND: GENAI_KIND})


def _engine_secret(store: Any, name: str, api_base: str, api_key: str) -> str:
    """The engine's address and key, re-set on every start (a new port or a new vLLM key)."""
    auth = {"api_base": api_base}
    # The REST API looks secrets up by id only: find this one by name.
    secret = next((s for s in store.list_secret_infos(provider=GATEWAY_PROVIDER) if s.secret_name == name), None)
    if secret is None:
        return store.create_gateway_secret(secret_name=name, secret_value={"api_key": api_key},
                                           provider=GATEWAY_PROVIDER, auth_config=auth).secret_id
    store.update_gateway_secret(secret.secret_id, secret_value={"api_key": api_key}, auth_config=auth)
    return secret.secret_id


def _model_definition(store: Any, name: str, secret_id: str, model_name: str) -> str:
    # The REST store looks definitions up by id only: find this one by name among the secret's.
    found = next((d for d in store.list_gateway_model_definitions(secret_id=secret_id) if d.name == name), None)
    if found is None:
        return store.create_gateway_model_definition(name=name, secret_id=secret_id, provider=GATEWAY_PROVIDER,
                                                     model_name=model_name).model_definition_id
    if found.model_name != model_name:
        store.update_gateway_model_definition(found.model_definition_id, secret_id=secret_id, model_name=model_name,
                                              provider=GATEWAY_PROVIDER)
    return found.model_definition_id


def log_feedback(params: Params, trace_id: str, value: Any, rationale: str | None, user: str | None) -> str:
    """A person's rating or correction as the `user_feedback` assessment on a served request's trace (the
    project's store, where the gateway writes its traces). Returns the assessment id."""
    from mlflow.entities import AssessmentSource, AssessmentSourceType
    from mlflow.exceptions import MlflowException

    from oel.traces import FEEDBACK

    with _server_reachable(params):
        mlflow = _store(params)
        source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=user or "anonymous")
        try:  # an unknown id must not become an orphan assessment
            found = mlflow.get_trace(trace_id, silent=True) is not None
        except MlflowException:
            found = False
        if not found:
            raise TrackingError(f"trace {trace_id!r} is not in {params.tracking.uri}; pass the id of a served "
                                f"request's trace (or --conversation ID for its latest request)")
        return mlflow.log_feedback(trace_id=trace_id, name=FEEDBACK, value=value, rationale=rationale,
                                   source=source).assessment_id


def latest_trace(params: Params, conversation: str) -> str:
    """The newest trace of a conversation in the deployment experiment (serve.experiment)."""
    from oel.traces import SESSION

    with _server_reachable(params):
        mlflow = _store(params)
        found = mlflow.get_experiment_by_name(params.serve.experiment)
        traces = [] if found is None else mlflow.search_traces(
            locations=[found.experiment_id], filter_string=f"metadata.`{SESSION}` = '{conversation}'",
            order_by=["timestamp_ms DESC"], max_results=1, return_type="list", include_spans=False)
    if not traces:
        raise TrackingError(f"no trace of conversation {conversation!r} in experiment {params.serve.experiment!r} "
                            f"({params.tracking.uri}); was it sent through the gateway with its id?")
    return traces[0].info.trace_id


def _store(params: Params):
    """mlflow on the project's store, without choosing an experiment (traces name their own)."""
    import mlflow

    mlflow.set_tracking_uri(resolve_uri(params.tracking.uri))
    return mlflow


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

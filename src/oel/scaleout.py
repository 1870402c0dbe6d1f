"""Collect's shards: a split's episodes cut into contiguous slices, each one play() with its own call seed,
run where `orchestration.task_runner` says: in this process one after another (`local`), or as Prefect
tasks on a Dask cluster (`dask`, prefect-dask's DaskTaskRunner).

A shard is a self-contained unit of work: it builds its own backend (generation.backend) from the policy
folder, plays, and returns its episodes; the stage concatenates them in shard order and is still the only
writer of the round's trajectories (DVC's out), atomically. So a shard's result does not depend on where it
ran, and the Dask run writes byte-identical trajectories to the local one (tests/integration/
test_collect_dask.py). The shard count is what to compute (collect.shards, a DVC param): with sampling,
other shards mean other batches and call seeds; collect.shards: 1 is exactly the unsharded play.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oel.config import Params, SamplingParams
from oel.rollout import EpisodeSpec, derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One play() call: its episodes, sampling and call seed, and the policy it plays."""

    index: int
    specs: tuple[EpisodeSpec, ...]
    sampling: SamplingParams
    seed: int
    round_id: str
    policy: str
    policy_spec: str   # what build_backend loads (a policy folder or a model spec)


def cut(specs: list[EpisodeSpec], shards: int, seed: int) -> list[tuple[list[EpisodeSpec], int]]:
    """Contiguous, near-equal slices with their call seeds; one shard keeps `seed` itself (the unsharded play)."""
    if shards <= 1 or len(specs) <= 1:
        return [(list(specs), seed)] if specs else []
    n = min(shards, len(specs))
    bounds = [len(specs) * k // n for k in range(n + 1)]
    return [(list(specs[bounds[k]:bounds[k + 1]]), derive_seed(seed, "shard", k)) for k in range(n)]


def play_shard(params: Params, root: str, shard: Shard) -> dict[str, Any]:
    """Play one shard with a backend of its own; episodes as JSON rows (what crosses process boundaries)."""
    from oel.games import make_game
    from oel.rollout import build_backend, play, release

    backend = build_backend(params, shard.policy_spec, Path(root))
    try:
        episodes = play(list(shard.specs), lambda name: make_game(name, params.games, Path(root)), backend,
                        shard.sampling, round_id=shard.round_id, policy=shard.policy,
                        batch_size=params.collect.batch_size, seed=shard.seed, progress=False)
    finally:
        release(backend)
    return {"index": shard.index, "pid": os.getpid(), "host": os.uname().nodename,
            "episodes": [ep.model_dump(mode="json") for ep in episodes]}


def run_shards(params: Params, root: Path, shards: list[Shard]) -> list[dict[str, Any]]:
    """Every shard's result, in shard order, on the configured task runner."""
    if params.orchestration.task_runner == "dask":
        return _on_dask(params, str(root), shards)
    return [play_shard(params, str(root), shard) for shard in shards]


def _on_dask(params: Params, root: str, shards: list[Shard]) -> list[dict[str, Any]]:
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    orch = params.orchestration
    if orch.dask_address:
        runner = DaskTaskRunner(address=orch.dask_address)
    else:
        # Processes, one thread each: a shard holds a model, and torch wants the cores to itself.
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": orch.dask_workers, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None})
    shard_task = task(play_shard, name="collect-shard", retries=1)

    @flow(name="collect-shards", task_runner=runner, log_prints=False)
    def collect_shards() -> list[dict[str, Any]]:
        futures = [shard_task.with_options(task_run_name=f"collect-shard-{s.index}").submit(params, root, s)
                   for s in shards]
        return [f.result() for f in futures]

    where = orch.dask_address or f"a local Dask cluster of {orch.dask_workers} workers"
    log.info("collect: %d shards as Prefect tasks on %s", len(shards), where)
    with _prefect_api():
        return collect_shards()


@contextmanager
def _prefect_api() -> Iterator[None]:
    """The Prefect API the flow and every Dask worker report to. Under `oel-iteration` (or with
    PREFECT_API_URL set) that is the flow's server; otherwise one temporary local server for the shards, its
    URL in the environment the worker processes inherit (each would start its own ephemeral server)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()

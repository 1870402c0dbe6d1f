"""Collect's shards as Prefect tasks on a Dask task runner (prefect-dask), a 2-worker LocalCluster on CPU
with the tiny model and real sampling: the trajectories are byte-identical to the same shards played in the
stage's own process, and the shards really ran in two worker processes."""

from __future__ import annotations

import os

import pytest

from oel.paths import ProjectPaths
from oel.stages import collect
from tests.conftest import tiny_params

# A Prefect server and a 2-process Dask cluster start for this one test: ~2 minutes on 2 busy cores.
pytestmark = pytest.mark.slow


def test_dask_shards_write_the_local_trajectories(project, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("OEL_TRACKING", "off")
    games = {"sokoban": {"enabled": False}, "textworld": {"enabled": False}}
    sizes = {"episodes_per_game": 4, "extraction_episodes_per_game": 2, "batch_size": 2, "shards": 2}
    out, summaries = {}, {}
    for runner in ("local", "dask"):
        params = tiny_params(model={"name": str(tiny_model_dir)}, games=games, collect=sizes,
                             orchestration={"task_runner": runner, "dask_workers": 2})
        paths = ProjectPaths(project / runner).round("r1")
        summaries[runner] = collect.run(params, paths)
        out[runner] = paths.trajectories.read_bytes()
    assert out["dask"] == out["local"]
    assert summaries["dask"]["shards"] == 4 and summaries["dask"]["shard_processes"] == 2
    assert summaries["local"]["shard_processes"] == 1
    assert os.getpid()  # the local run stayed in this process (one pid above)

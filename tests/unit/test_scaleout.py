"""Collect's shards with a scripted backend: contiguous slices, shard order kept, the same episodes as the
unsharded play when responses do not depend on batching; collect.shards 1 is the unsharded path."""

from __future__ import annotations

import oel.rollout
from oel.artifacts import read_jsonl
from oel.paths import ProjectPaths
from oel.rollout import EpisodeSpec, FakeBackend
from oel.scaleout import cut
from oel.schemas import Episode
from oel.stages import collect
from tests.conftest import tiny_params


def test_cut_is_contiguous_and_keeps_the_unsharded_seed():
    specs = [EpisodeSpec("frozenlake", s) for s in range(7)]
    parts = cut(specs, 3, seed=11)
    assert [len(p) for p, _ in parts] == [2, 2, 3] and [s for p, _ in parts for s in p] == specs
    assert len({seed for _, seed in parts}) == 3
    assert cut(specs, 1, 11) == [(specs, 11)] and cut([], 4, 11) == []
    assert len(cut(specs[:2], 5, 11)) == 2  # never an empty shard


def test_sharded_collect_writes_the_unsharded_trajectories(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(oel.rollout, "build_backend", lambda params, spec, root: built.append(spec) or FakeBackend())
    monkeypatch.setattr(collect, "build_backend", lambda params, spec, root: FakeBackend())
    games = {"sokoban": {"enabled": False}, "textworld": {"enabled": False}}
    out = {}
    for shards in (1, 3):
        params = tiny_params(games=games, collect={"episodes_per_game": 5, "extraction_episodes_per_game": 2,
                                                   "batch_size": 2, "shards": shards})
        paths = ProjectPaths(tmp_path / f"s{shards}").round("r1")
        summary = collect.run(params, paths)
        out[shards] = paths.trajectories.read_bytes()
        if shards == 3:
            assert summary["shards"] == 3 + 2 and summary["shard_processes"] == 1  # user 3, extract 2 (of 2)
            assert len(built) == 5  # every shard builds its own backend
        else:
            assert "shards" not in summary
    assert out[1] == out[3]
    episodes = read_jsonl(tmp_path / "s3" / "data" / "r1" / "trajectories.jsonl", Episode)
    assert [ep.split for ep in episodes] == ["user"] * 5 + ["extract"] * 2

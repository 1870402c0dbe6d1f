"""MLflow traces of play and extraction (oel.traces), with the tiny random model and real stages:
one trace per episode with a span per turn, one per extraction call in the session of the episode it
read, datasets on the stage runs, and byte-identical stage outputs with tracing on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oel.paths import ProjectPaths
from oel.stages import collect, evaluate, extract
from oel.stages._common import stage_main
from tests.conftest import MODEL_CACHE, tiny_params


def make_root(root: Path, traces: str) -> Path:
    (root / ".cache").mkdir(parents=True)
    (root / ".cache" / "models").symlink_to(MODEL_CACHE)
    raw = tiny_params(games={"textworld": {"enabled": False}}, eval={"ood": False},
                      tracking={"uri": f"sqlite:///{root}/mlruns/mlflow.db", "traces": traces}).model_dump(mode="json", by_alias=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def run_stages(root: Path) -> dict[str, bytes]:
    """collect + extract of r1 and eval of base, as `oel <stage>` runs them; their outputs' bytes."""
    for stage, fn, round_id in (("collect", collect.run, "r1"), ("extract", extract.run, "r1"),
                                ("eval", evaluate.run, "base")):
        stage_main(stage, fn, round_id, root / "params.yaml", root)
    r1, base = ProjectPaths(root).round("r1"), ProjectPaths(root).round("base")
    return {p.name: p.read_bytes() for p in (r1.trajectories, r1.items, r1.extract_summary, base.eval_episodes,
                                             base.details)}


def traces(root: Path, stage: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("oel")
    return mlflow.search_traces(locations=[exp.experiment_id], filter_string=f"tags.`oel.stage` = '{stage}'",
                                return_type="list", max_results=1000)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = make_root(tmp_path_factory.mktemp("on"), "all")
    return root, run_stages(root)


def test_every_episode_is_a_trace_with_a_span_per_turn(traced):
    from oel.artifacts import read_jsonl
    from oel.schemas import Episode

    root, _ = traced
    episodes = {ep.episode_id: ep for ep in read_jsonl(ProjectPaths(root).round("r1").trajectories, Episode)}
    found = traces(root, "collect")
    assert len(found) == len(episodes) > 0
    for trace in found:
        tags, meta = trace.info.tags, trace.info.trace_metadata
        ep = episodes[meta["mlflow.trace.session"]]
        assert (tags["oel.round"], tags["oel.game"], tags["oel.seed"], tags["oel.policy"]) == (
            "r1", ep.game, str(ep.seed), "base")
        assert tags["oel.outcome"] == ("success" if ep.success else "failure") and tags["oel.store"] == "none"
        turns = [s for s in trace.data.spans if s.parent_id is not None]
        assert len(turns) == len(ep.turns)
        first = min(turns, key=lambda s: s.start_time_ns)
        assert first.inputs["messages"] == [m.model_dump() for m in ep.turns[0].prompt]
        assert first.outputs["choices"][0]["message"]["content"] == ep.turns[0].response
        assert first.outputs["action"] == ep.turns[0].action and first.outputs["observation"] == ep.turns[0].observation
        assert first.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == ep.turns[0].response_tokens
        # The trace belongs to the collect@r1 stage run.
        assert meta["mlflow.sourceRun"]


def test_extraction_calls_are_traces_in_the_session_of_the_episode_they_read(traced):
    root, _ = traced
    params = tiny_params(games={"textworld": {"enabled": False}})
    calls = traces(root, "extract")
    assert len(calls) == params.extract.stores * params.extract.steps * len(params.games.enabled())
    played = {t.info.trace_metadata["mlflow.trace.session"] for t in traces(root, "collect")}
    for call in calls:
        assert call.info.trace_metadata["mlflow.trace.session"] in played
        assert call.info.tags["oel.policy"] == "base" and call.info.tags["oel.outcome"]
        (span,) = call.data.spans
        assert span.inputs["messages"][-1]["role"] == "user"
    assert len(traces(root, "eval")) == params.eval.episodes_per_game * len(params.games.enabled())


def test_stage_runs_log_their_inputs_and_outputs_as_datasets(traced):
    import mlflow

    from oel.tracking import dvc_md5

    root, _ = traced
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("oel")
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'extract@r1'")
    logged = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"], d.dataset.digest)
              for d in run.inputs.dataset_inputs}
    r1 = ProjectPaths(root).round("r1")
    assert logged == {("data/r1/trajectories.jsonl", "input", dvc_md5(r1.trajectories)),
                      ("data/r1/knowledge/items.jsonl", "output", dvc_md5(r1.items)),
                      ("data/r1/knowledge/extract_summary.json", "output", dvc_md5(r1.extract_summary))}


def test_tracing_off_gives_byte_identical_outputs_and_no_trace(traced, tmp_path):
    _, traced_bytes = traced
    off = make_root(tmp_path / "off", "off")
    assert run_stages(off) == traced_bytes
    assert traces(off, "collect") == [] and traces(off, "extract") == [] and traces(off, "eval") == []

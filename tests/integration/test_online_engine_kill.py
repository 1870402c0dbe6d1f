"""The serving engine killed for real in the middle of a streamed answer: the client sees the failure, and what
collect reads of the gateway's traces holds the answers given before it and nothing of the cut one (no partial
reply becomes a training row). Its own stack: the kill ends the engine the other stack tests share."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import mlflow
import openai
import pytest

from oel import traces
from oel.models.loading import write_policy
from oel.online import conversation
from oel.online.stack import start
from oel.schemas import PolicyManifest
from tests.conftest import MODEL_CACHE
from tests.integration.test_online_stack import project_params

pytestmark = pytest.mark.e2e


def test_an_engine_killed_mid_stream_leaves_no_partial_answer_for_collect(tmp_path: Path, tiny_model_dir):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "models").symlink_to(MODEL_CACHE)
    write_policy(tmp_path / "models" / "base", PolicyManifest(model="tiny-random", round="base"))
    params = project_params(tmp_path)
    since = time.time_ns() // 1_000_000
    with start(params, tmp_path) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key="unused", timeout=60, max_retries=0)
        whole, cut = f"whole-{uuid.uuid4()}", f"cut-{uuid.uuid4()}"
        answered = client.chat.completions.create(
            model="oel", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=1.0,
            extra_headers={conversation.HEADER: whole})
        stream = client.chat.completions.create(
            model="oel", messages=[{"role": "user", "content": "A long story, please."}], max_tokens=2000,
            temperature=1.0, stream=True, extra_headers={conversation.HEADER: cut})
        chunks = iter(stream)
        next(chunks)  # the answer has started
        engine = stack.processes["engine"]
        engine.kill()
        engine.wait(timeout=30)
        with pytest.raises(openai.APIError):  # the cut is the client's to see, not a quiet short answer
            for _ in chunks:
                pass
        deadline = time.monotonic() + 60
        while True:  # the gateway writes traces asynchronously: until both requests are there
            store = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
            experiment = store.get_experiment_by_name(params.serve.experiment)
            sessions = [t.info.trace_metadata.get(traces.SESSION)
                        for t in store.search_traces(locations=[experiment.experiment_id])]
            if {whole, cut} <= set(sessions) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {whole, cut} <= set(sessions)  # both requests were traced
        exchanges, skipped = traces.read_exchanges(store, params.serve.experiment, since,
                                                   time.time_ns() // 1_000_000)
    assert [ex.session for ex in exchanges] == [whole]
    assert exchanges[0].reply["content"] == answered.choices[0].message.content
    assert skipped["failed"] + skipped["no_response"] == 1  # the cut answer: read as failed, never as a reply

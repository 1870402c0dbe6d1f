"""The served stack for real on the tiny random model: `transformers serve` behind the MLflow AI Gateway (an MLflow
server on the test's SQLite store), both on 127.0.0.1, driven by the official openai client as an app would.

Each request must come back and be a trace in the deployment experiment whose session is the conversation id the
app sent; feedback must land on it; a promotion must move the gateway to the new version (with a canary share
first) without failing a request already streaming, and a rollback must move it back. The decisions are written
as the gate writes them (the gate itself is tested in tests/integration/test_promotion_rounds.py); r1's weights
are a copy of base's, so only the name the engine answers under tells the versions apart.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import openai
import pytest
from typer.testing import CliRunner

from oel.cli import app as cli
from oel.models.loading import write_policy
from oel.online import conversation
from oel.online.stack import CONFIG_TTL_S, route, start
from oel.paths import ProjectPaths
from oel.rounds.records import Decision, write_decision
from oel.schemas import PolicyManifest
from oel.traces import FEEDBACK, SESSION
from tests.conftest import MODEL_CACHE, tiny_params

pytestmark = pytest.mark.e2e  # two servers, a model load: not in the fast unit run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_params(root: Path, **serve):
    return tiny_params(tracking={"uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"},
                       serve={"port": free_port(), "engine_port": free_port(), "startup_timeout_s": 300, **serve})


def decide(root: Path, round_id: str, decision: str, before: str, after: str) -> None:
    write_decision(ProjectPaths(root).round(round_id).promotion,
                   Decision(round=round_id, **{"from": "base"}, policy="gate", alpha=0.05, champion_before=before,
                            decision=decision, champion_after=after, reason=f"test: {decision}"))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("served")
    (root / ".cache").mkdir()
    (root / ".cache" / "models").symlink_to(MODEL_CACHE)
    write_policy(root / "models" / "base", PolicyManifest(model="tiny-random", round="base"))
    r1 = root / "models" / "r1"
    shutil.copytree(tiny_model_dir, r1, ignore=shutil.ignore_patterns(".complete"))
    write_policy(r1, PolicyManifest(merged=True, round="r1"))
    return root


@pytest.fixture(scope="module")
def served(project: Path):
    params = project_params(project)
    with start(params, project) as stack:  # stops the gateway and the engine whatever the tests do
        yield params, stack


@pytest.fixture
def client(served) -> openai.OpenAI:
    _, stack = served
    return openai.OpenAI(base_url=stack.base_url, api_key="unused", timeout=120, max_retries=0)


def ask(client: openai.OpenAI, conv: str, messages: list[dict], **kwargs):
    return client.chat.completions.create(model="oel", messages=messages, max_tokens=8,
                                          extra_headers={conversation.HEADER: conv}, **kwargs)


def traces_of(params, conv: str, n: int, timeout: float = 60.0) -> list:
    """The deployment experiment's traces in a conversation, once the gateway has written `n` of them."""
    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    experiment = client.get_experiment_by_name(params.serve.experiment)
    deadline = time.monotonic() + timeout
    while True:
        found = client.search_traces(locations=[experiment.experiment_id],
                                     filter_string=f"metadata.`{SESSION}` = '{conv}'", order_by=["timestamp_ms ASC"])
        if len(found) >= n or time.monotonic() > deadline:
            return list(found)
        time.sleep(0.5)


def test_a_chat_request_is_one_trace_in_its_conversation(served, client):
    params, _ = served
    conv = f"chat-{uuid.uuid4()}"
    reply = ask(client, conv, [{"role": "user", "content": "What is the capital of France?"}])
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.model == "oel-base"
    (trace,) = traces_of(params, conv, 1)
    assert trace.info.trace_metadata[SESSION] == conv
    assert trace.info.state == "OK"
    assert "capital of France" in json.dumps(trace.data.request)


def test_a_streamed_request_is_one_trace_with_the_whole_answer(served, client):
    params, _ = served
    conv = f"stream-{uuid.uuid4()}"
    chunks = list(ask(client, conv, [{"role": "user", "content": "Count to three."}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    (trace,) = traces_of(params, conv, 1)
    assert trace.info.trace_metadata[SESSION] == conv
    assert json.loads(trace.data.response)["choices"][0]["message"]["content"] == text


def test_the_turns_of_a_conversation_share_one_session(served, client):
    params, _ = served
    conv = f"turns-{uuid.uuid4()}"
    history = [{"role": "user", "content": "Hello!"}]
    for turn in range(3):
        reply = ask(client, conv, history)
        history += [{"role": "assistant", "content": reply.choices[0].message.content},
                    {"role": "user", "content": f"And then? ({turn})"}]
    other = f"turns-{uuid.uuid4()}"
    ask(client, other, [{"role": "user", "content": "Unrelated."}])
    traces = traces_of(params, conv, 3)
    assert len(traces) == 3
    assert len(json.loads(traces[-1].data.request)["messages"]) == 5  # the last turn carried the whole history
    assert len(traces_of(params, other, 1)) == 1


def test_a_request_without_a_conversation_id_never_gets_another_requests_session(served, client):
    """The scope is per request: a headerless stream right after a headered one, and headerless streams running
    beside headered ones, are traced with no session (a leaked session would mix two users' turns in a round)."""
    params, _ = served
    tag = uuid.uuid4().hex
    convs = {f"mix-{tag}-{i}": f"conv-{tag}-{i}" if i % 2 else None for i in range(6)}

    def send(text: str) -> None:
        conv = convs[text]
        list(client.chat.completions.create(model="oel", messages=[{"role": "user", "content": text}], max_tokens=4,
                                            stream=True, extra_headers={conversation.HEADER: conv} if conv else {}))

    first, second, *rest = convs
    send(second)  # headered, then headerless at once
    send(first)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, rest))
    experiment = mlflow.MlflowClient(params.tracking.uri).get_experiment_by_name(params.serve.experiment)
    deadline, sessions = time.monotonic() + 60, {}
    while len(sessions) < len(convs) and time.monotonic() < deadline:
        for trace in mlflow.MlflowClient(params.tracking.uri).search_traces(locations=[experiment.experiment_id]):
            request = json.loads(trace.data.request or "{}")  # a request refused before the engine has none
            text = (request.get("messages") or [{}])[0].get("content")
            if text in convs:
                sessions[text] = trace.info.trace_metadata.get(SESSION)
        time.sleep(0.5)
    assert sessions == convs


def test_a_request_samples_at_its_temperature_and_temperature_zero_is_greedy(client):
    """The tiny model's own generation config says greedy, as SmolLM2's does; the served copy samples."""
    def replies(temperature: float) -> set[str]:
        return {ask(client, f"temp-{uuid.uuid4()}", [{"role": "user", "content": "Say something."}],
                    temperature=temperature).choices[0].message.content for _ in range(3)}

    assert len(replies(1.0)) > 1
    assert len(replies(0.0)) == 1


def test_tools_and_tool_results_pass_through_to_the_engine_and_the_trace(served, client):
    params, _ = served
    conv = f"tools-{uuid.uuid4()}"
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    reply = ask(client, conv, messages, tools=tools)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    (trace,) = traces_of(params, conv, 1)
    request = json.loads(trace.data.request)
    assert request["tools"][0]["function"]["name"] == "get_weather"
    assert request["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert request["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}


def test_feedback_lands_on_the_trace_by_id_and_by_conversation(served, client):
    params, _ = served
    conv = f"feedback-{uuid.uuid4()}"
    ask(client, conv, [{"role": "user", "content": "Tell me a joke."}])
    ask(client, conv, [{"role": "user", "content": "Another one."}])
    first, second = traces_of(params, conv, 2)
    params_file = _params_file(params)
    runner = CliRunner()
    done = runner.invoke(cli, ["feedback", first.info.trace_id, "--value", "false", "--rationale", "not funny",
                               "--user", "u-17", "--params", str(params_file)])
    assert done.exit_code == 0, done.output
    done = runner.invoke(cli, ["feedback", "--conversation", conv, "--value", "0.75", "--params", str(params_file)])
    assert done.exit_code == 0, done.output
    store = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    (rated,) = [a for a in store.get_trace(first.info.trace_id).info.assessments if a.name == FEEDBACK]
    assert (rated.value, rated.rationale, rated.source.source_id) == (False, "not funny", "u-17")
    (latest,) = [a for a in store.get_trace(second.info.trace_id).info.assessments if a.name == FEEDBACK]
    assert latest.value == 0.75
    missing = runner.invoke(cli, ["feedback", "tr-0000", "--value", "1", "--params", str(params_file)])
    assert missing.exit_code == 2 and "error: trace 'tr-0000' is not in" in missing.output


def test_a_conversation_id_that_cannot_be_a_session_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="X-Conversation-Id"):
        ask(client, "x' OR '1'='1", [{"role": "user", "content": "hi"}])


def served_by(client: openai.OpenAI, conv: str, wanted: set[str], timeout: float = 3 * CONFIG_TTL_S) -> set[str]:
    """The versions behind the last 12 answers, asking until they are `wanted`: MLflow applies a route change
    when the gateway's cached routes expire (CONFIG_TTL_S)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(ask(client, conv, [{"role": "user", "content": "hi"}]).model)
        if set(seen[-12:]) == wanted:
            break
        time.sleep(0.1)
    return set(seen[-12:])


def test_a_promotion_moves_the_gateway_without_failing_a_streaming_request(served, client, project):
    params, _ = served
    conv = f"swap-{uuid.uuid4()}"
    stream = ask(client, conv, [{"role": "user", "content": "A long story, please."}], stream=True)
    first = next(iter(stream))  # in flight on oel-base
    decide(project, "r1", "champion", "base", "r1")
    assert route(params, project) == {"r1": 1.0}
    rest = list(stream)  # the request started on base finishes there
    assert first.model == "oel-base" and rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert served_by(client, conv, {"oel-r1"}) == {"oel-r1"}

    decide(project, "r1", "rolled_back", "base", "base")  # `oel rollback`: the champion is base again
    assert route(params, project, full=True) == {"base": 1.0}
    assert served_by(client, conv, {"oel-base"}) == {"oel-base"}


def test_a_canary_share_first_then_every_request(served, client, project):
    params, _ = served
    canary = params.model_copy(update={"serve": params.serve.model_copy(update={"canary": 0.5})})
    decide(project, "r1", "champion", "base", "r1")
    assert route(canary, project) == {"r1": 0.5, "base": 0.5}
    assert route(canary, project) == {"r1": 0.5, "base": 0.5}  # a running canary stays until --full
    assert served_by(client, "canary", {"oel-r1", "oel-base"}) == {"oel-r1", "oel-base"}
    assert route(canary, project, full=True) == {"r1": 1.0}
    assert served_by(client, "canary", {"oel-r1"}) == {"oel-r1"}


def test_a_kept_back_round_is_never_served(served, project):
    params, _ = served
    decide(project, "r1", "challenger", "base", "base")
    assert route(params, project, full=True) == {"base": 1.0}


def test_a_canary_its_users_rate_worse_is_rolled_back_and_one_they_rate_alike_is_kept(served, client, project):
    """`oel canary` on real traffic: the version behind each answer read from its trace, the users' ratings logged
    as feedback on the traces, the verdict recorded, the gateway moved."""
    import yaml

    params, _ = served
    canary = params.model_copy(update={"serve": params.serve.model_copy(
        update={"canary": 0.5, "canary_min_ratings": 6, "canary_margin": 0.1})})
    params_file = project / "canary-params.yaml"
    params_file.write_text(yaml.safe_dump(canary.model_dump(mode="json", by_alias=True), sort_keys=False))
    runner = CliRunner()

    def run_canary(rate_r1: bool) -> str:
        """Serve a canary of r1 until both versions answered 6 times, rate them, and let `oel canary` judge."""
        decide(project, "r1", "rolled_back", "base", "base")
        assert route(params, project, full=True) == {"base": 1.0}  # base serves alone; now r1 promoted, a canary
        decide(project, "r1", "champion", "base", "r1")
        assert route(canary, project) == {"r1": 0.5, "base": 0.5}
        time.sleep(CONFIG_TTL_S + 1)  # until the gateway's cached routes expire: both versions answer
        conv, answered = f"canary-{uuid.uuid4()}", {"oel-r1": 0, "oel-base": 0}
        while min(answered.values()) < 6:
            answered[ask(client, conv, [{"role": "user", "content": f"hi {sum(answered.values())}"}]).model] += 1
        for trace in traces_of(params, conv, sum(answered.values())):
            version = json.loads(trace.data.response)["model"]
            mlflow.log_feedback(trace_id=trace.info.trace_id, name=FEEDBACK,
                                value=rate_r1 if version == "oel-r1" else True)
        done = runner.invoke(cli, ["canary", "--params", str(params_file), "--root", str(project)])
        assert done.exit_code == 0, done.output
        return done.output

    mlflow.set_tracking_uri(params.tracking.uri)
    said = run_canary(rate_r1=False)
    assert "canary r1 vs base: rolled back" in said and "r1 0/" in said and "gateway oel: oel-base 100%" in said
    decision = json.loads(ProjectPaths(project).round("r1").promotion.read_text())
    assert decision["decision"] == "rolled_back" and decision["events"][-1]["kind"] == "canary"
    assert served_by(client, "after-canary", {"oel-base"}) == {"oel-base"}

    said = run_canary(rate_r1=True)
    assert "canary r1 vs base: kept" in said and "gateway oel: oel-r1 100%" in said
    assert served_by(client, "after-canary", {"oel-r1"}) == {"oel-r1"}


def _params_file(params) -> Path:
    path = Path(params.tracking.uri.removeprefix("sqlite:///")).parent.parent / "params.yaml"
    if not path.is_file():
        import yaml

        path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False))
    return path


def test_a_gateway_stopped_right_after_answering_has_written_every_trace(served, client):
    """Last in this module: it stops the module's gateway with SIGTERM, as `oel serve` does."""
    params, stack = served
    conv = f"stop-{uuid.uuid4()}"
    for i in range(20):
        ask(client, conv, [{"role": "user", "content": f"question {i}"}])
    gateway = stack.processes["gateway"]
    gateway.terminate()  # traces are written asynchronously: some are still queued now
    assert gateway.wait(timeout=60) == 0
    assert len(traces_of(params, conv, 20, timeout=5.0)) == 20

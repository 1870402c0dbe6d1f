"""collect.source: traces without MLflow: which traces a window reads, how requests chain into conversations,
what feedback a conversation gets, and the rows collect writes (traces shaped as the gateway records them:
root span inputs = the chat request, outputs = the response; see tests/integration/test_traces_round.py for
the real recorder and store)."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from oel.artifacts import ArtifactError, read_jsonl
from oel.paths import ProjectPaths
from oel.schemas import Episode
from oel.stages import collect
from oel.traces import FEEDBACK, SESSION, Exchange, Feedback, TracesError, conversations, read_exchanges
from tests.conftest import tiny_params

SYSTEM = {"role": "system", "content": "You are a support agent."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


def ex(trace_id: str, end_ms: int, messages: list[dict], reply: str, session: str | None = None,
       feedback: tuple[Feedback, ...] = ()) -> Exchange:
    return Exchange(trace_id=trace_id, end_ms=end_ms, session=session, messages=messages, reply=bot(reply),
                    feedback=list(feedback))


# ---- conversations ------------------------------------------------------------------------------------------

def test_a_resent_history_chains_requests_into_one_conversation():
    a1 = ex("a1", 10, [SYSTEM, user("hi")], "Hello!")
    b1 = ex("b1", 11, [user("weather?")], "Sunny.")
    # the client resends the reply as it got it, nulls and extra keys included
    a2 = ex("a2", 20, [SYSTEM, user("hi"), bot("Hello!", tool_calls=None, refusal=None), user("order 42?")], "Shipped.")
    b2 = ex("b2", 21, [user("weather?"), bot("Sunny."), user("tomorrow?")], "Rain.")
    convs = conversations([b2, a2, b1, a1])  # any input order: by end time, then trace id
    assert [c.trace_ids for c in convs] == [["a1", "a2"], ["b1", "b2"]]
    assert convs[0].messages == [*a2.messages, bot("Shipped.")]



def test_a_continuation_ending_in_the_same_millisecond_still_continues():
    """Trace ends are whole milliseconds: a fast engine ends a request and its continuation in the same one,
    and a trace id that sorts first must not put the continuation before what it continues."""
    first = ex("z-first", 10, [user("hi")], "Hello!")
    then = ex("a-then", 10, [user("hi"), bot("Hello!"), user("thanks")], "Welcome.")
    assert [c.trace_ids for c in conversations([then, first])] == [["z-first", "a-then"]]

def test_same_opening_from_two_users_and_a_regenerated_reply_stay_apart():
    one = ex("u1", 10, [user("hi")], "Hello!")
    two = ex("u2", 11, [user("hi")], "Hello!")
    one_next = ex("u1b", 20, [user("hi"), bot("Hello!"), user("A")], "a")
    two_next = ex("u2b", 21, [user("hi"), bot("Hello!"), user("B")], "b")
    # a client regenerating: the same messages again, so not an extension of the first reply
    again = ex("u1c", 30, [user("hi"), bot("Hello!"), user("A")], "a, again")
    convs = conversations([one, two, one_next, two_next, again])
    assert [c.trace_ids for c in convs] == [["u1", "u1b"], ["u2", "u2b"], ["u1c"]]


def test_a_session_only_chains_its_own_requests():
    first = ex("s1", 10, [user("hi")], "Hello!", session="alice")
    other = ex("s2", 20, [user("hi"), bot("Hello!"), user("x")], "y", session="bob")
    same = ex("s3", 30, [user("hi"), bot("Hello!"), user("x")], "y", session="alice")
    assert [c.trace_ids for c in conversations([first, other, same])] == [["s1", "s3"], ["s2"]]


def test_tool_calls_and_content_parts_chain_as_resent():
    call = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\": 4}"}}]
    first = Exchange(trace_id="t1", end_ms=1, messages=[user("where is 4?")],
                     reply={"role": "assistant", "content": None, "tool_calls": call})
    second = ex("t2", 2, [{"role": "user", "content": [{"type": "text", "text": "where is 4?"}]},
                          {"role": "assistant", "content": "", "tool_calls": call},
                          {"role": "tool", "tool_call_id": "call_1", "content": "in Paris"}], "In Paris.")
    assert [c.trace_ids for c in conversations([first, second])] == [["t1", "t2"]]


def fb(aid: str, created: int, value, rationale: str | None = None, overrides: str | None = None) -> Feedback:
    return Feedback(assessment_id=aid, created_ms=created, value=value, rationale=rationale, overrides=overrides)


def test_a_conversations_feedback_is_the_latest_that_was_not_overridden():
    first = ex("a", 10, [user("hi")], "Hello!", feedback=(fb("f1", 12, 1.0),))
    second = ex("b", 20, [user("hi"), bot("Hello!"), user("and?")], "More.",
                feedback=(fb("f2", 25, False, "wrong"), fb("f3", 26, True, overrides="f2")))
    (conv,) = conversations([first, second])
    assert conv.feedback.assessment_id == "f3"
    (alone,) = conversations([first])
    assert alone.feedback.assessment_id == "f1"


@pytest.mark.parametrize("value, rationale, expected", [
    (True, None, True),
    (0.0, "too long", {"rating": 0.0, "text": "too long"}),
    ("Answer in French, please.", "ignored", "Answer in French, please."),
    ({"rating": 1, "text": "great"}, "why", {"rating": 1, "text": "great"}),
    ({"score": -1}, "rude", {"score": -1, "text": "rude"}),
    (None, "just a comment", "just a comment"),
])
def test_feedback_reads_as_a_chat_logs_feedback_field(value, rationale, expected):
    assert collect.feedback_value(fb("f", 1, value, rationale)) == expected
    assert collect.feedback_value(None) is None


# ---- the window ---------------------------------------------------------------------------------------------

def trace(trace_id: str, start_ms: int, duration_ms: int, *, inputs=None, outputs=None, state: str = "OK",
          status: str = "OK", assessments=(), metadata=None) -> SimpleNamespace:
    """A trace as MlflowClient.search_traces returns it, with the gateway's root span."""
    inputs = {"messages": [user(f"q {trace_id}")], "temperature": 0.7} if inputs is None else inputs
    outputs = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"a {trace_id}", "tool_calls": None},
         "finish_reason": "stop"}]} if outputs is None else outputs
    root = SimpleNamespace(parent_id=None, name="gateway/oel", inputs=inputs, outputs=outputs,
                           status=SimpleNamespace(status_code=status))
    info = SimpleNamespace(trace_id=trace_id, state=SimpleNamespace(value=state), request_time=start_ms,
                           execution_duration=duration_ms, trace_metadata=metadata or {},
                           assessments=list(assessments))
    return SimpleNamespace(info=info, data=SimpleNamespace(spans=[root]))


def assessment(aid: str, created: int, value, name: str = FEEDBACK, rationale=None) -> SimpleNamespace:
    return SimpleNamespace(name=name, assessment_id=aid, create_time_ms=created, rationale=rationale,
                           overrides=None, feedback=SimpleNamespace(value=value))


class Page(list):
    token: str | None = None


class FakeClient:
    """Serves traces in pages of two; applies no filter, so the reader's own window check is what is tested."""

    def __init__(self, traces, experiments=("deploy",)):
        self.traces, self.experiments, self.calls = traces, experiments, []

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="7") if name in self.experiments else None

    def search_traces(self, locations, filter_string, max_results, order_by, page_token):
        self.calls.append((locations, filter_string, page_token))
        start = int(page_token or 0)
        page = Page(self.traces[start:start + 2])
        page.token = str(start + 2) if start + 2 < len(self.traces) else None
        return page


def test_the_window_is_by_end_time_and_failed_or_empty_requests_are_skipped():
    traces = [
        trace("early", 900, 50),                                    # ended at 950 <= since
        trace("ok", 990, 20, assessments=[assessment("f1", 1500, 1.0), assessment("late", 2001, 0.0),
                                           assessment("judge", 1500, 0.2, name="relevance")]),
        trace("failed", 1100, 5, state="ERROR", status="ERROR", outputs=None),  # engine killed mid-request
        trace("empty", 1200, 5, outputs={"choices": []}),
        trace("silent", 1300, 5, outputs={"choices": [{"message": {"role": "assistant", "content": "\n\n "}}]}),
        trace("embeddings", 1400, 5, inputs={"input": ["text"]}),
        trace("straddles", 1990, 20),                               # ended at 2010 > until
    ]
    client = FakeClient(traces)
    exchanges, skipped = read_exchanges(client, "deploy", since_ms=1000, until_ms=2000)
    assert [e.trace_id for e in exchanges] == ["ok"]
    assert skipped == {"failed": 1, "no_response": 2, "not_chat": 1}
    assert [f.assessment_id for f in exchanges[0].feedback] == ["f1"]  # by name, and created by `until`
    assert exchanges[0].end_ms == 1010 and exchanges[0].reply["content"] == "a ok"
    assert client.calls[0][:2] == (["7"], "trace.end_time_ms <= 2000 AND trace.end_time_ms > 1000")
    assert [c[2] for c in client.calls] == [None, "2", "4", "6"]  # every page read


def test_an_unknown_experiment_is_one_line_naming_the_fix():
    with pytest.raises(TracesError, match=r"experiment 'nope': not in the tracking store; .*serve\.experiment"):
        read_exchanges(FakeClient([]), "nope", None, 10)


def test_the_session_comes_from_trace_metadata():
    (got,), _ = read_exchanges(FakeClient([trace("t", 1, 1, metadata={SESSION: "chat-9"})]), "deploy", None, 10)
    assert got.session == "chat-9"


# ---- the stage ----------------------------------------------------------------------------------------------

UNTIL = datetime(2026, 1, 2, tzinfo=UTC)
UNTIL_MS = int(UNTIL.timestamp() * 1000)


def traces_params(**collect_section):
    return tiny_params(rounds={"r1": {"from": "base", "collect": {
        "source": "traces", "experiment": "deploy", "until": UNTIL.isoformat()}}},
        collect={"import_heldout_fraction": 0.0, **collect_section})


def use_client(monkeypatch, client) -> None:
    @contextmanager
    def fake(_params):
        yield client
    monkeypatch.setattr(collect.tracking, "client", fake)


def chat_trace(trace_id, end, messages, reply, assessments=()):
    return trace(trace_id, end - 10, 10, inputs={"messages": messages}, assessments=assessments,
                 outputs={"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})


def test_collect_writes_a_chat_row_per_conversation_with_its_trace_ids(tmp_path, monkeypatch):
    first = [SYSTEM, user("Hi, I'm ada@example.com")]
    use_client(monkeypatch, FakeClient([
        chat_trace("tr-1", UNTIL_MS - 500, first, "Hello!"),
        chat_trace("tr-2", UNTIL_MS - 400, [*first, bot("Hello!"), user("Answer in French.")], "Bonjour !",
                   assessments=[assessment("f", UNTIL_MS - 300, 1.0, rationale="merci")]),
        chat_trace("tr-3", UNTIL_MS - 200, [user("Call +1 415 555 0132")], "Done."),
        chat_trace("tr-4", UNTIL_MS - 100, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                   "A cat."),
    ]))
    paths = ProjectPaths(tmp_path).round("r1")
    summary = collect.run(traces_params(), paths)
    rows = read_jsonl(paths.trajectories, Episode)
    assert [(r.episode_id, r.trace_ids) for r in rows] == [("tr-1", ["tr-1", "tr-2"]), ("tr-3", ["tr-3"])]
    ada = rows[0]
    assert ada.game == "chat" and ada.split == "imported" and ada.round == "r1" and len(ada.turns) == 2
    assert ada.reward == 1.0 and ada.success and ada.feedback == "merci"
    assert ada.turns[0].observation == "Answer in French."      # the user's next message, as in a chat log
    assert "ada@example.com" not in paths.trajectories.read_text() and "[EMAIL_1]" in ada.turns[0].prompt[1].content
    assert rows[1].feedback == "No feedback." and not rows[1].success
    assert summary["traces"] == 3 and summary["skipped"]["unreadable"] == 1  # image parts cannot be learned from
    assert summary["scrubbed"] == {"EMAIL": 1, "PHONE": 1}

    first_bytes = paths.trajectories.read_bytes()
    collect.run(traces_params(), paths)
    assert paths.trajectories.read_bytes() == first_bytes


def test_an_until_in_the_future_or_an_empty_window_writes_nothing(tmp_path, monkeypatch):
    paths = ProjectPaths(tmp_path).round("r1")
    later = tiny_params(rounds={"r1": {"from": "base", "collect": {
        "source": "traces", "experiment": "deploy", "until": "2999-01-01T00:00:00Z"}}})
    with pytest.raises(ArtifactError, match="is in the future"):
        collect.run(later, paths)
    use_client(monkeypatch, FakeClient([trace("failed", UNTIL_MS - 50, 10, state="ERROR", status="ERROR")]))
    with pytest.raises(ArtifactError, match=r"holds no answered chat request .* \(skipped: failed 1\)"):
        collect.run(traces_params(), paths)
    assert not paths.trajectories.exists()


def test_a_traces_round_has_no_log_to_import(tmp_path):
    with pytest.raises(ArtifactError, match="reads the gateway's traces"):
        collect.log_path(traces_params(), "r1", tmp_path)


def test_messages_of_odd_shapes_chain_or_not_but_never_raise():
    odd = Exchange(trace_id="o1", end_ms=1, messages=[{"role": ["user"], "content": {"text": "x"},
                                                       "tool_calls": "call it"}], reply=bot("y"))
    also = Exchange(trace_id="o2", end_ms=2, messages=[{"role": "user", "content": "q",
                                                        "tool_calls": [{"function": "lookup"}, 7]}], reply=bot("r"))
    assert [c.trace_ids for c in conversations([odd, also])] == [["o1"], ["o2"]]
    got, skipped = read_exchanges(FakeClient([trace("t", 1, 1), trace("bad", 1, 1, inputs={"messages": "hi"})]),
                                  "deploy", None, 10)
    assert [e.trace_id for e in got] == ["t"] and skipped == {"failed": 0, "no_response": 0, "not_chat": 1}


def test_a_window_is_quoted_times_with_a_timezone_each_round_starting_where_the_last_ended(tmp_path):
    import yaml

    from oel.config import ParamsError, load_params

    def check(rounds: str) -> str:
        (tmp_path / "params.yaml").write_text(f"rounds:\n{rounds}")
        with pytest.raises(ParamsError) as err:
            load_params(tmp_path / "params.yaml")
        return str(err.value).split(": ", 1)[1]

    # DVC stops on an unquoted YAML timestamp in a tracked param: refused first, with the quoted form to write.
    assert check("  r1: {from: base, collect: {source: traces, experiment: d, until: 2026-12-04T14:00:00Z}}") == \
        "rounds.r1.collect.until: quote the time, e.g. until: '2026-12-04T14:00:00Z' (DVC tracks this param and " \
        "cannot read an unquoted YAML timestamp)"
    assert check("  r1: {from: base, collect: {source: traces, experiment: d, until: '2026-12-04T14:00:00'}}") == \
        "rounds.r1.collect.until: give a timezone, e.g. 2026-12-04T14:00:00Z (UTC) or +02:00"
    two = ("  r1: {from: base, collect: {source: traces, experiment: d, until: '2026-12-04T14:00:00Z'}}\n"
           "  r2: {from: r1, collect: {source: traces, experiment: d, until: '2026-12-05T14:00:00Z'%s}}")
    assert check(two % "") == ("(top level): rounds.r2.collect.since: round r1 read 'd' until 2026-12-04T14:00:00Z; "
                               "set since: '2026-12-04T14:00:00Z' so this window starts there")
    assert "the windows overlap" in check(two % ", since: '2026-12-04T13:00:00Z'")
    assert "source: traces needs experiment" in check("  r1: {from: base, collect: {source: traces}}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"rounds": {
        "r1": {"from": "base", "collect": {"source": "traces", "experiment": "d", "until": "2026-12-04T15:00:00+01:00"}},
        "r2": {"from": "r1", "collect": {"source": "traces", "experiment": "d", "since": "2026-12-04T14:00:00Z",
                                         "until": "2026-12-05T14:00:00Z"}}}}))
    window = load_params(tmp_path / "params.yaml").rounds["r2"].source
    assert window.since == datetime(2026, 12, 4, 14, tzinfo=UTC) and window.until.tzinfo == UTC


def test_a_blank_reply_is_no_response_and_drops_out_of_the_history_that_follows(tmp_path, monkeypatch):
    # A tiny model answers "\n\n..."; the client resends it, and the user goes on.
    use_client(monkeypatch, FakeClient([
        chat_trace("b-1", UNTIL_MS - 500, [user("hi")], "\n\n\n"),
        chat_trace("b-2", UNTIL_MS - 400, [user("hi"), bot("\n\n\n"), user("hello?")], "Hello!"),
    ]))
    paths = ProjectPaths(tmp_path).round("r1")
    summary = collect.run(traces_params(), paths)
    (row,) = read_jsonl(paths.trajectories, Episode)
    assert row.trace_ids == ["b-2"] and summary["skipped"]["no_response"] == 1
    assert [m.content for m in row.turns[0].prompt] == ["hi", "hello?"] and row.turns[0].response == "Hello!"

"""`make demo-online`'s orchestration end to end on the tiny random model, at its smallest: the real stack
(`transformers serve` behind the MLflow AI Gateway on 127.0.0.1), a few simulated users per phase through the openai
client, their ratings, a round collected from the gateway's traces and learned stage by stage (1 distill step), the
gate, the swap when promoted, fresh users, and the report. The tiny model's replies are noise, so the test checks
shapes and bookkeeping, never a success rate: every answered request is a trace in its user's conversation, every
rated conversation reaches the trajectories with its rating, the trajectories cite only the first phase's traces,
and the after phase is served by whatever the gate made champion."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from oel.online import demo
from tests.conftest import MODEL_CACHE

pytestmark = pytest.mark.e2e  # two servers and seven stage processes: not in the fast unit run

REPO = Path(__file__).resolve().parents[2]
USERS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(model: Path) -> demo.DemoConfig:
    raw = demo.yaml.safe_load((REPO / "examples" / "online-demo.yaml").read_text())
    params = raw["params"]
    params["model"] = {"name": str(model), "dtype": "float32"}
    params["distill"] = {"steps": 1, "batch_size": 2, "top_k": 8, "sampling": {"max_new_tokens": 6}}
    params["eval"] = {**params["eval"], "episodes_per_game": 2, "batch_size": 4, "ood_max_new_tokens": 4,
                      "gap_prompts": 2, "sampling": {"max_new_tokens": 6}}
    params["serve"] = {"port": free_port(), "engine_port": free_port(), "startup_timeout_s": 300}
    return demo.DemoConfig(demo={"users": USERS, "concurrency": 2, "request": {"max_tokens": 6, "temperature": 1.0}},
                           params=params)


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_model_dir):
    # The tiny model is built in the repository's model cache, which the demo folder links like the embedded ones.
    assert tiny_model_dir.parent == MODEL_CACHE
    base = tmp_path_factory.mktemp("demo")
    root = base / "project"
    # The tiny model's generation config says greedy (its greedy reply is blank lines, which collect skips); the
    # served copy samples at the request's temperature (oel.online.engine.link_version).
    config, here = tiny_config(tiny_model_dir), Path.cwd()
    try:
        result = demo.run(config, root, REPO)
    finally:
        os.chdir(here)
    return root, result, config


def test_the_report_has_every_section_and_number(ran):
    root, result, _ = ran
    text = demo.render(result, "tiny")
    for heading in ("## Users' success", "## The round from the traces", "## The gate and the swap",
                    "## Wall time per phase"):
        assert heading in text
    assert "knowledge comes from a file" in text.lower()
    before, after = demo.success_line(result.before), demo.success_line(result.after)
    assert before["n"] + before["failed"] == USERS and after["n"] + after["failed"] == USERS
    assert "| before | " in text and f"{before['k']}/{before['n']} = " in text
    names = [ph.name for ph in result.phases]
    assert names[0] == "oel base" and names[-1] == "after: ratings logged"
    assert all(f"{stage} r1" in names for stage in demo.LEARN)
    assert all(ph.seconds >= 0 for ph in result.phases)


def test_no_request_failed_and_every_one_is_a_trace(ran):
    _, result, _ = ran
    fb = result.feedback
    assert [t["error"] for t in result.before + result.after] == [None] * (2 * USERS)
    assert fb["before_traced"] == fb["before_requests"] and fb["after_traced"] == fb["after_requests"]
    for phase, talks in (("before", result.before), ("after", result.after)):
        answered = [t for t in talks if any(reply.strip() for reply in t["replies"])]
        assert fb[f"{phase}_answered"] == sum(bool(reply.strip()) for t in talks for reply in t["replies"])
        assert fb[f"{phase}_rated"] == len(answered)


def test_the_trajectories_are_the_first_users_conversations_with_their_ratings(ran):
    root, result, _ = ran
    r = result.round
    answered = [t for t in result.before if any(reply.strip() for reply in t["replies"])]
    assert r["conversations"] == len(answered) > 0
    assert r["traces_used"] == result.feedback["before_answered"] and r["traces_not_served"] == 0
    assert r["rated"] == len(answered)
    assert r["successes"] == sum(t["success"] for t in answered)
    rows = [json.loads(line) for line in (root / "data" / "r1" / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(len(row["turns"]) for row in rows) == sorted(sum(bool(x.strip()) for x in t["replies"])
                                                               for t in answered)
    assert {tid for row in rows for tid in row["trace_ids"]} <= set(result.round["before_trace_ids"])


def test_the_after_phase_is_served_by_the_gates_champion(ran):
    _, result, _ = ran
    gate = result.gate
    assert gate["decision"] in ("champion", "challenger")
    assert gate["served"] == ("oel-r1" if gate["decision"] == "champion" else "oel-base")
    served = {name for t in result.after for name in t["served_by"]}
    assert served == {gate["served"]}
    assert {name for t in result.before for name in t["served_by"]} == {"oel-base"}


def test_the_stack_is_stopped_after_the_demo(ran):
    root, _, config = ran
    assert not (root / ".cache" / "serve" / "stack.json").exists()
    for port in (config.params["serve"]["port"], config.params["serve"]["engine_port"]):
        with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

"""extract.source: file -- knowledge given by a file reaches every store and the distillation teacher."""

from __future__ import annotations

import pytest

from oel.artifacts import read_jsonl
from oel.config import ParamsError
from oel.errors import UserError
from oel.knowledge import MARKER
from oel.paths import ProjectPaths
from oel.schemas import DistillRow, KnowledgeItem
from oel.stages import consolidate, extract
from tests.conftest import tiny_params
from tests.unit.test_extract import fl_params, make_episode, write_trajectories

RULES = """# FrozenLake rules (comments and blank lines are skipped)

- Answer with exactly one bracketed action, e.g. [down].
* The goal is down and to the right; avoid H.
"""


def file_params(name: str = "rules.md", **extract_over):
    return fl_params(extract={"source": "file", "knowledge_file": name, "stores": 2, "max_knowledge_tokens": 64,
                              "max_item_tokens": 32, **extract_over})


def test_file_items_fill_every_store_and_reach_the_teacher(project):
    write_trajectories(project, [make_episode("x0"), make_episode("u0", split="user")])
    (project / "rules.md").write_text(RULES, encoding="utf-8")
    paths = ProjectPaths(project).round("r1")
    summary = extract.run(file_params(), paths, backend=None)  # no backend: no model may load
    items = read_jsonl(paths.items, KnowledgeItem)
    texts = ["Answer with exactly one bracketed action, e.g. [down].", "The goal is down and to the right; avoid H."]
    assert [(i.store, i.text) for i in items] == [(0, texts[0]), (0, texts[1]), (1, texts[0]), (1, texts[1])]
    assert all(i.source_episode == "file:rules.md" and i.tokens > 0 for i in items)
    assert summary["source"] == "file" and summary["responses"] == 0 and summary["items_kept"] == 4
    consolidate.run(file_params(), paths)
    store = paths.game_stores("frozenlake") / "store-1.md"
    assert store.read_text("utf-8") == "\n".join(f"{MARKER} {t}" for t in texts)
    rows = read_jsonl(paths.distill_rows, DistillRow)
    assert rows and all(texts[1] in r.teacher_prompt[-1].content and texts[1] not in r.prompt[-1].content
                        for r in rows)


def test_users_game_takes_its_rule_file(project):
    """The same path for the simulated users: stores per game, the file's items in each."""
    write_trajectories(project, [make_episode("x0", game="users")])
    (project / "users.md").write_text("Always reply in French.\n", encoding="utf-8")
    paths = ProjectPaths(project).round("r1")
    params = tiny_params(games={"frozenlake": {"enabled": False}, "sokoban": {"enabled": False},
                                "textworld": {"enabled": False}, "users": {"enabled": True}},
                         extract={"source": "file", "knowledge_file": "users.md", "stores": 1})
    extract.run(params, paths)
    (item,) = read_jsonl(paths.items, KnowledgeItem)
    assert (item.game, item.text) == ("users", "Always reply in French.")


@pytest.mark.parametrize("content, words", [
    (None, "no such knowledge file"),
    ("# only a comment\n\n", "holds no item"),
    (b"\xff\xfe\x00bad", "UTF-8"),
    ("- " + "very long rule " * 40 + "\n", "max_item_tokens"),
    ("".join(f"- rule number {i} about the lake\n" for i in range(20)), "max_knowledge_tokens"),
])
def test_bad_file_is_one_line_and_writes_nothing(project, content, words):
    write_trajectories(project, [make_episode("x0")])
    if isinstance(content, bytes):
        (project / "rules.md").write_bytes(content)
    elif content is not None:
        (project / "rules.md").write_text(content, encoding="utf-8")
    paths = ProjectPaths(project).round("r1")
    with pytest.raises(UserError) as err:
        extract.run(file_params(), paths)
    assert words in str(err.value) and "rules.md" in str(err.value) and "\n" not in str(err.value)
    assert not paths.items.exists()


def test_source_file_without_a_path_is_refused_at_load():
    with pytest.raises(ParamsError, match="knowledge_file"):
        fl_params(extract={"source": "file"})


def test_imported_chat_logs_take_a_rule_file(project):
    """A round on OpenAI chat logs (no simulator): the file's items become the `chat` store, and the
    distillation teacher reads them in its system message while the student prompt stays the logged one."""
    import json

    from oel.chatlog import read_chatlog

    log = project / "logs.jsonl"
    log.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": f"Where is my order {n}?"},
        {"role": "assistant", "content": "It shipped yesterday and should arrive soon."},
        {"role": "user", "content": "Please, in French!"}]}) + "\n" for n in range(3)), encoding="utf-8")
    write_trajectories(project, read_chatlog(log, "r1", split="user").episodes)
    (project / "policy.md").write_text("- Always reply in French.\n", encoding="utf-8")
    paths = ProjectPaths(project).round("r1")
    extract.run(file_params("policy.md", stores=1), paths)
    assert [(i.game, i.text) for i in read_jsonl(paths.items, KnowledgeItem)] == [("chat", "Always reply in French.")]
    consolidate.run(file_params("policy.md", stores=1), paths)
    rows = read_jsonl(paths.distill_rows, DistillRow)
    assert rows and all(r.game == "chat" for r in rows)
    for row in rows:
        assert "Always reply in French." in row.teacher_prompt[0].content and row.teacher_prompt[0].role == "system"
        assert all("Always reply in French." not in m.content for m in row.prompt)

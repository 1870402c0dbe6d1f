"""Rows -> schedule and tokens: seeded cycling, clear errors, teacher prompts never truncated."""

from __future__ import annotations

import pytest

from oel.artifacts import write_jsonl
from oel.distill.dataset import chat_ids, left_pad, load_rows, schedule, to_records
from oel.errors import UserError
from oel.schemas import DistillRow, Message


def make_rows(n: int, knowledge: str = "Knowledge: go down.") -> list[DistillRow]:
    return [DistillRow(row_id=f"r{i}", episode_id=f"e{i}", game="frozenlake", turn=0, store=0,
                       prompt=[Message(role="user", content=f"Board {i}. Which move?")],
                       teacher_prompt=[Message(role="user", content=f"{knowledge}\nBoard {i}. Which move?")])
            for i in range(n)]


def test_schedule_cycles_every_row_in_a_seeded_order():
    order = schedule(5, 12, seed=3)
    assert len(order) == 12
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))  # each pass covers every row once
    assert order == schedule(5, 12, seed=3)
    assert order != schedule(5, 12, seed=4)


def test_missing_or_empty_rows_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="consolidate"):
        load_rows(tmp_path / "distill.jsonl")
    (tmp_path / "distill.jsonl").write_text("")
    with pytest.raises(UserError, match="no rows"):
        load_rows(tmp_path / "distill.jsonl")


def test_rows_round_trip_into_records(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", make_rows(3))
    records = to_records(load_rows(tmp_path / "d.jsonl"), [2, 0])
    assert [r["row_id"] for r in records] == ["r2", "r0"]
    assert records[0]["prompt"] == [{"role": "user", "content": "Board 2. Which move?"}]
    assert records[0]["privileged_context"][0]["content"].startswith("Knowledge: go down.")


def test_student_limit_keeps_newest_tokens_and_teacher_is_whole(tiny_model):
    tok = tiny_model.tokenizer
    msgs = [{"role": "user", "content": "word " * 200}]
    full = chat_ids(tok, msgs)
    assert len(full) > 200
    assert chat_ids(tok, msgs, max_tokens=16) == full[-16:]
    assert full[-3:] == chat_ids(tok, [{"role": "user", "content": "x"}])[-3:]  # ends with the generation prompt


def test_left_pad_aligns_prompt_ends():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def dp(**kw):
    from oel.config import DistillParams

    return DistillParams(**{"steps": 4, "batch_size": 2, **kw})


def test_once_derives_the_accumulation_from_the_row_count(monkeypatch):
    from oel.distill.trainer import grad_accum, samples_needed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert grad_accum(dp(schedule="once"), 8) == 1             # 4 steps x 2 rows: exactly one micro-batch
    assert grad_accum(dp(schedule="once"), 9) == 2             # one row more needs a second micro-batch
    assert grad_accum(dp(schedule="once", grad_accum=7), 24) == 3  # distill.grad_accum is not used
    assert samples_needed(dp(schedule="once"), 9) == 16
    monkeypatch.setenv("WORLD_SIZE", "2")                      # every process takes its own micro-batch
    assert grad_accum(dp(schedule="once"), 17) == 2 and samples_needed(dp(schedule="once"), 17) == 32


def test_cycle_keeps_the_configured_accumulation(monkeypatch):
    from oel.distill.trainer import grad_accum, samples_needed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert grad_accum(dp(grad_accum=3), 5) == 3 and samples_needed(dp(grad_accum=3), 5) == 24


def test_once_with_too_few_rows_is_a_one_line_user_error(monkeypatch):
    from oel.distill.trainer import grad_accum

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="at least 8 rows") as err:
        grad_accum(dp(schedule="once"), 7)
    assert "\n" not in str(err.value) and "distill.steps" in str(err.value)


def test_once_uses_every_row_once_then_pads_the_last_micro_batches(monkeypatch):
    from oel.distill.trainer import samples_needed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    n_rows = 11
    order = schedule(n_rows, samples_needed(dp(schedule="once"), n_rows), seed=5)
    assert len(order) == 16                                    # 4 steps x 2 micro-batches x 2 rows
    assert sorted(order[:n_rows]) == list(range(n_rows))       # every row once, in the first pass
    padding = order[n_rows:]
    assert len(padding) == 5 and len(set(padding)) == 5        # the fewest to fill the steps, no row thrice
    assert order == schedule(n_rows, 16, seed=5)               # seeded: a resumed run sees the same rows

"""oel.gap on the tiny model: the KL's extremes (identical prompts give exactly zero), held-out-only rows."""

from __future__ import annotations

import pytest

from oel import gap
from oel.chatlog import CHAT_GAME
from oel.config import SamplingParams
from oel.errors import UserError
from oel.schemas import Episode, Message, Turn


def _episode(i: int, split: str) -> Episode:
    turns = [Turn(index=0, prompt=[Message(role="system", content="Be brief."),
                                   Message(role="user", content=f"What is {i} plus {i}?")],
                  response=str(2 * i), valid=True, observation="thanks")]
    return Episode(episode_id=f"c{i}", game=CHAT_GAME, seed=i, split=split, round="r1", policy="deployed",
                   turns=turns, success=False, reward=0.0, feedback="thanks")


EPISODES = [_episode(i, "heldout" if i % 2 else "imported") for i in range(8)]
SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=5)


def test_rows_are_the_heldout_turns_with_the_store_in_the_system_message():
    rows = gap.gap_rows(EPISODES, ["- EXPERIENCE ITEM: answer with the number only."], 0, 1, "r1")
    assert [r.row_id for r in rows] == ["c1/t0", "c3/t0", "c5/t0", "c7/t0"]
    assert all("answer with the number only" in r.teacher_prompt[0].content for r in rows)
    assert gap.gap_rows(EPISODES, ["k"], 2, 1, "r1") == gap.gap_rows(EPISODES, ["k"], 2, 1, "r1")  # seeded
    assert len(gap.gap_rows(EPISODES, ["k"], 2, 1, "r1")) == 2
    with pytest.raises(UserError, match="no held-out conversation"):
        gap.gap_rows([e for e in EPISODES if e.split == "imported"], ["k"], 0, 1, "r1")


def test_identical_prompts_have_zero_gap_and_knowledge_a_positive_one(tiny_model):
    rows = gap.gap_rows(EPISODES, ["- EXPERIENCE ITEM: reply in French."], 0, 1, "r1")
    same = [gap.GapRow(r.row_id, r.store, r.prompt, r.prompt) for r in rows]
    zero = gap.measure(tiny_model, tiny_model, same, SAMPLING, seed=3, batch_size=2)
    assert zero["kl_mean"] == pytest.approx(0.0, abs=1e-6) and zero["prompts"] == 4
    moved = gap.measure(tiny_model, tiny_model, rows, SAMPLING, seed=3, batch_size=2)
    assert moved["kl_mean"] > 1e-6 and moved["kl_ci_low"] <= moved["kl_mean"] <= moved["kl_ci_high"]
    assert moved["lengths"] == zero["lengths"]  # the same student, prompts and seed sample the same replies
    paired = gap.compare(moved, zero)
    assert paired["reduction_mean"] == pytest.approx(moved["kl_mean"]) and paired["length_change_mean"] == 0

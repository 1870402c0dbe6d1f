"""distill.retention_weight (issue 15, ReSAIL's privileged retention) at its extremes, on the tiny model:
lambda 0 is today's loss exactly, an unchanged student adds zero, a moved student adds a positive term, and the
stage logs both parts."""

from __future__ import annotations

import pytest
import torch

from oel.distill.loss import masked_token_mean, reverse_kl_topk, with_retention
from oel.stages import distill as stage
from tests.conftest import tiny_params
from tests.integration.test_distill_stage import (
    fixed_batch,
    make_rows,
    perturb_student,
    setup_round,
    trainer_for,
)

COMPLETIONS = [[504, 1116, 2], [33, 44, 55, 66]]


def test_with_retention_at_zero_weight_is_the_same_tensor():
    distill, retention = torch.tensor(0.25, requires_grad=True), torch.tensor(3.0)
    assert with_retention(distill, retention, 0.0) is distill
    assert with_retention(distill, None, 0.5) is distill
    assert with_retention(distill, retention, 0.5).item() == 0.25 + 1.5


def loss_of(trainer, rows):
    return trainer.compute_loss(trainer.model, fixed_batch(trainer, rows, COMPLETIONS, pad=2))


def test_zero_weight_equals_todays_loss_and_an_unmoved_student_adds_nothing(tiny_model, tmp_path):
    rows = make_rows(2)
    today = loss_of(trainer_for(tiny_model, rows, tiny_params(), tmp_path), rows).item()
    off = loss_of(trainer_for(tiny_model, rows, tiny_params(distill={"retention_weight": 0.0}), tmp_path), rows).item()
    assert off == today  # exactly: no extra forward, no extra term
    # At the round's start the student (LoRA B = 0) IS the teacher: retention is zero, the loss is unchanged.
    on = trainer_for(tiny_model, rows, tiny_params(distill={"retention_weight": 1.0}), tmp_path)
    batch = fixed_batch(on, rows, COMPLETIONS, pad=2)
    d = on._compute_teacher_student_logits(on.model, on.teacher_model, batch)
    assert on._retention(on.model, batch, d, reverse_kl_topk).abs().item() < 1e-6
    assert abs(on.compute_loss(on.model, batch).item() - today) < 1e-6


def test_a_moved_student_pays_for_its_with_knowledge_drift(tiny_model, tmp_path):
    rows = make_rows(2)
    weight = 0.5
    on = trainer_for(tiny_model, rows, tiny_params(distill={"retention_weight": weight}), tmp_path)
    perturb_student(on)
    batch = fixed_batch(on, rows, COMPLETIONS, pad=2)
    d = on._compute_teacher_student_logits(on.model, on.teacher_model, batch)
    distill = masked_token_mean(reverse_kl_topk(d.student_logits, d.teacher_logits, 8, 0.7), d.loss_mask).item()
    retention = on._retention(on.model, batch, d, reverse_kl_topk).item()
    assert retention > 1e-5  # the with-knowledge view moved away from the frozen teacher
    assert on.compute_loss(on.model, batch).item() == pytest.approx(distill + weight * retention, rel=1e-5)


def test_the_stage_logs_both_parts_with_retention_on(project):
    paths = setup_round(project, make_rows(3))
    # A large LR: the tiny random model's views barely differ, and the student must visibly move in one step.
    summary = stage.run(tiny_params(distill={"retention_weight": 1.0, "learning_rate": 1e-2}), paths)
    assert summary["retention_weight"] == 1.0
    first, last = summary["history"][0], summary["history"][-1]
    for h in summary["history"]:
        assert h["loss"] == pytest.approx(h["loss_distill"] + 1.0 * h["loss_retention"], rel=1e-4, abs=1e-7)
    assert abs(first["loss_retention"]) < 1e-6  # step 1: the student with knowledge IS the frozen teacher
    assert last["loss_retention"] > 1e-5  # after an update its with-knowledge view has drifted
    assert summary["loss_retention_last"] == last["loss_retention"]

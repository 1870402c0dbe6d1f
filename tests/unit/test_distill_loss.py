"""The consolidation loss: zero at identity, reverse (not forward) KL, response tokens only; and the forward KL
of the off-policy baseline."""

from __future__ import annotations

import math

import pytest
import torch

from oel.distill.loss import (
    forward_kl_full,
    forward_kl_topk,
    kl_full_both,
    masked_token_mean,
    response_mask,
    reverse_kl_full,
    reverse_kl_topk,
)

V = 6


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)  # [1, time, vocab]


def test_identical_distributions_give_zero_loss():
    x = torch.randn(2, 5, V)
    assert torch.allclose(reverse_kl_topk(x, x.clone(), top_k=3, temperature=0.7), torch.zeros(2, 5), atol=1e-7)
    assert torch.allclose(reverse_kl_full(x, x.clone(), temperature=0.7), torch.zeros(2, 5), atol=1e-7)


def test_student_mass_where_teacher_has_none_is_positive():
    student = logits([8.0, 0, 0, 0, 0, 0])   # confident on token 0
    teacher = logits([-8.0, 4, 4, 0, 0, 0])  # teacher puts almost nothing there
    assert reverse_kl_topk(student, teacher, top_k=2, temperature=1.0).item() > 5.0


def test_moving_student_toward_teacher_lowers_the_loss():
    teacher = logits([0.0, 3, 0, 0, 0, 0])
    far, near = logits([3.0, 0, 0, 0, 0, 0]), logits([1.0, 2, 0, 0, 0, 0])
    kl = [reverse_kl_topk(s, teacher, top_k=V, temperature=0.7).item() for s in (far, near, teacher)]
    assert kl[0] > kl[1] > kl[2] == 0.0


def test_it_is_kl_student_teacher_not_the_reverse():
    # Student spread over tokens the teacher ignores; the two directions differ a lot here.
    s, t = logits([2.0, 2, 2, 2, -9, -9]), logits([6.0, -9, -9, -9, 0, 0])
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    reverse = (ps * (ps.log() - pt.log())).sum(-1)
    forward = (pt * (pt.log() - ps.log())).sum(-1)
    got = reverse_kl_topk(s, t, top_k=V, temperature=1.0)
    assert torch.allclose(got, reverse, atol=1e-4)
    assert not torch.allclose(got, forward, atol=1e-1)
    assert torch.allclose(reverse_kl_full(s, t, temperature=1.0), reverse, atol=1e-4)
    both = kl_full_both(s, t, temperature=1.0)  # the trainer's logged pair, from one log-softmax per side
    assert torch.allclose(both[0], reverse, atol=1e-4) and torch.allclose(both[1], forward, atol=1e-4)
    assert torch.allclose(both[1], forward_kl_full(s, t, temperature=1.0), atol=1e-6)


def test_topk_uses_student_support_full_vocab_probs_without_renormalising():
    s, t = logits([3.0, 2, 1, 0, -1, -2]), logits([0.0, 1, 2, 3, 0, 0])
    ls, lt = torch.log_softmax(s / 0.7, -1), torch.log_softmax(t / 0.7, -1)
    top = [0, 1]  # the student's two most likely tokens
    expected = sum(ls[0, 0, v].exp() * (ls[0, 0, v] - lt[0, 0, v]) for v in top)
    assert torch.allclose(reverse_kl_topk(s, t, top_k=2, temperature=0.7)[0, 0], expected, atol=1e-5)


def test_temperature_changes_the_loss():
    s, t = logits([3.0, 0, 0, 0, 0, 0]), logits([0.0, 3, 0, 0, 0, 0])
    assert reverse_kl_topk(s, t, 4, 0.7).item() != reverse_kl_topk(s, t, 4, 1.0).item()


def test_only_the_student_gets_gradient():
    s = torch.randn(1, 3, V, requires_grad=True)
    t = torch.randn(1, 3, V, requires_grad=True)
    reverse_kl_topk(s, t, 3, 0.7).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_response_mask_stops_after_first_eos_inclusive():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, eos, 7, eos], [5, eos, pad, pad, pad], [5, 6, 7, 8, 9]])
    assert response_mask(ids, [eos]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert response_mask(ids, [eos], lengths=torch.tensor([5, 5, 3])).tolist()[2] == [1, 1, 1, 0, 0]


def test_masked_positions_contribute_nothing_and_mean_is_per_token():
    per_token = torch.tensor([[1.0, 3.0, 1000.0], [2.0, -500.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_token_mean(per_token, mask).item() == (1 + 3 + 2) / 3  # token mean, not mean of row means
    assert masked_token_mean(per_token, torch.zeros_like(mask)).item() == 0.0


# --- forward KL(teacher || student): the OPCD off-policy baseline ---


def test_forward_kl_is_zero_for_identical_distributions():
    x = torch.randn(2, 5, V)
    assert torch.allclose(forward_kl_topk(x, x.clone(), top_k=3, temperature=0.7), torch.zeros(2, 5), atol=1e-7)
    assert torch.allclose(forward_kl_full(x, x.clone(), temperature=0.7), torch.zeros(2, 5), atol=1e-7)


def test_forward_kl_of_a_known_shift_matches_the_hand_computed_value():
    # At T=0.7, teacher logits (0.7 ln 3, 0) give p_T = (3/4, 1/4); a flat student gives p_S = (1/2, 1/2).
    teacher = torch.tensor([[[0.7 * math.log(3.0), 0.0]]])
    student = torch.zeros(1, 1, 2)
    full = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)      # 0.1308
    assert forward_kl_full(student, teacher, 0.7).item() == pytest.approx(full, abs=1e-6)
    assert forward_kl_topk(student, teacher, 2, 0.7).item() == pytest.approx(full, abs=1e-6)
    # Top-1 keeps the teacher's favourite token only: 3/4 ln(3/2) > 0, no renormalisation.
    assert forward_kl_topk(student, teacher, 1, 0.7).item() == pytest.approx(0.75 * math.log(1.5), abs=1e-6)
    # The reverse direction on the same pair is another number: 1/2 ln(2/3) + 1/2 ln 2 = 0.1438.
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert reverse_kl_full(student, teacher, 0.7).item() == pytest.approx(reverse, abs=1e-6)
    assert abs(full - reverse) > 0.01


def test_forward_kl_uses_the_teacher_support_not_the_students():
    # The student is sure of token 0; the teacher of token 3. Top-1 over the teacher's support scores token 3.
    s, t = logits([3.0, 2, 1, 0, -1, -2]), logits([0.0, 1, 2, 3, 0, 0])
    ls, lt = torch.log_softmax(s / 0.7, -1), torch.log_softmax(t / 0.7, -1)
    expected = lt[0, 0, 3].exp() * (lt[0, 0, 3] - ls[0, 0, 3])
    assert torch.allclose(forward_kl_topk(s, t, top_k=1, temperature=0.7)[0, 0], expected, atol=1e-5)
    assert expected.item() > 0  # the student under-weights the teacher's token: a positive term


def test_forward_and_reverse_differ_on_an_asymmetric_case():
    s, t = logits([2.0, 2, 2, 2, -9, -9]), logits([6.0, -9, -9, -9, 0, 0])
    ps, pt = torch.softmax(s, -1), torch.softmax(t, -1)
    forward = (pt * (pt.log() - ps.log())).sum(-1)
    got = forward_kl_topk(s, t, top_k=V, temperature=1.0)
    assert torch.allclose(got, forward, atol=1e-4)
    assert torch.allclose(forward_kl_full(s, t, temperature=1.0), forward, atol=1e-4)
    assert not torch.allclose(got, reverse_kl_topk(s, t, top_k=V, temperature=1.0), atol=1e-1)


def test_forward_kl_gradient_reaches_the_student_only_and_pulls_toward_the_teacher():
    t = torch.tensor([[[2.0, 0.0, 0.0]]], requires_grad=True)
    s = torch.zeros(1, 1, 3, requires_grad=True)
    forward_kl_topk(s, t, 3, 1.0).sum().backward()
    assert t.grad is None
    assert s.grad[0, 0, 0] < 0  # raising the student's logit on the teacher's favourite lowers the loss

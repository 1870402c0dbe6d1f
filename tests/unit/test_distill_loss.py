"""The consolidation loss: zero at identity, reverse (not forward) KL, response tokens only."""

from __future__ import annotations

import torch

from oel.distill.loss import masked_token_mean, response_mask, reverse_kl_full, reverse_kl_topk

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

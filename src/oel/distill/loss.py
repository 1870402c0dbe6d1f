"""The consolidation loss of OEL as pure torch functions (no model, no trainer).

Per response position t, with p = softmax(logits / T) over the FULL vocabulary:

    kl_t = sum_{v in TopK(p_S(t))} p_S(v) * (log p_S(v) - log p_T(v))

i.e. the reverse KL(student || teacher) restricted to the student's top-k tokens, with no renormalisation
over the top-k (the reference's `kl_renorm_topk=False`), then a token mean over every response token of the
batch (`loss_agg_mode: token-mean`). Only the student carries gradient; both factors p_S and log p_S are
differentiated, as in the reference. Tensors are [batch, time, vocab] logits and a [batch, time] 0/1 mask.

The OPCD off-policy baseline (`distill.mode: off_policy`, the reference's `on_policy_merge=False`, which swaps
the arguments) trains on teacher-sampled tokens with the mirror, the forward KL(teacher || student):

    kl_t = sum_{v in TopK(p_T(t))} p_T(v) * (log p_T(v) - log p_S(v))

over the teacher's top-k support, same temperature, no renormalisation, same token mean.

Privileged retention (`distill.retention_weight` = lambda, ReSAIL; off by default): the same top-k KL, on the
TEACHER prompt, between the student with knowledge in context and the frozen round-start teacher (same
prompt, same completion), added as loss = distill + lambda x retention. It keeps the with-knowledge view (the
next round's teacher) where it was while the no-knowledge view trains; lambda = 0 is exactly the loss above.
"""

from __future__ import annotations

import torch


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Full-vocabulary log-softmax at `temperature`, in float32 (bf16 log-softmax loses the tail)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def reverse_kl_topk(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int,
                    temperature: float) -> torch.Tensor:
    """Per-position sum over the student's top-k of p_S (log p_S - log p_T); shape [batch, time]."""
    student = log_probs(student_logits, temperature)
    teacher = log_probs(teacher_logits, temperature).detach()
    k = min(top_k, student.shape[-1])
    # The support is chosen by the student, so mass the teacher puts elsewhere is ignored (mode seeking).
    idx = student.detach().topk(k, dim=-1).indices
    s = student.gather(-1, idx)
    t = teacher.gather(-1, idx)
    return (s.exp() * (s - t)).sum(-1)


def forward_kl_topk(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int,
                    temperature: float) -> torch.Tensor:
    """Per-position sum over the teacher's top-k of p_T (log p_T - log p_S); shape [batch, time]."""
    student = log_probs(student_logits, temperature)
    teacher = log_probs(teacher_logits, temperature).detach()
    k = min(top_k, teacher.shape[-1])
    # The support is the teacher's: student mass outside it is only pushed down through the softmax (mass covering).
    idx = teacher.topk(k, dim=-1).indices
    s = student.gather(-1, idx)
    t = teacher.gather(-1, idx)
    return (t.exp() * (t - s)).sum(-1)


def reverse_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Exact per-position KL(student || teacher) over the whole vocabulary; shape [batch, time]."""
    student = log_probs(student_logits, temperature)
    teacher = log_probs(teacher_logits, temperature)
    return (student.exp() * (student - teacher)).sum(-1)


def forward_kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Exact per-position KL(teacher || student) over the whole vocabulary; shape [batch, time]."""
    return reverse_kl_full(teacher_logits, student_logits, temperature)


@torch.no_grad()
def kl_full_both(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(reverse_kl_full, forward_kl_full) for the log, without gradient. The trainer logs both every step (they
    were 0.3 s of an 8.4 s CPU step as two log-softmaxes per side): each side is scaled once and normalised and
    exponentiated in place, and both KLs share one difference."""
    student = student_logits.float() / temperature
    student -= torch.logsumexp(student, dim=-1, keepdim=True)
    teacher = teacher_logits.float() / temperature
    teacher -= torch.logsumexp(teacher, dim=-1, keepdim=True)
    diff = student - teacher
    return (student.exp_() * diff).sum(-1), (teacher.exp_() * diff).sum(-1).neg_()


def with_retention(distill: torch.Tensor, retention: torch.Tensor | None, weight: float) -> torch.Tensor:
    """distill + weight x retention; weight 0 (or no retention term) returns `distill` itself, bit for bit."""
    if weight == 0.0 or retention is None:
        return distill
    return distill + weight * retention


def response_mask(completion_ids: torch.Tensor, eos_ids: list[int], lengths: torch.Tensor | None = None) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it (and beyond `lengths`)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # Count EOS tokens strictly before each position: a position is in the response while that count is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    if lengths is not None:
        pos = torch.arange(completion_ids.shape[1], device=completion_ids.device)
        mask = mask * (pos.unsqueeze(0) < lengths.unsqueeze(1)).long()
    return mask


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where mask is 1, across the whole batch (token-mean, not sequence-mean)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)

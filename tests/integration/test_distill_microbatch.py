"""Token-budgeted micro-batches (distill.max_tokens_per_microbatch) and gradient checkpointing, the memory-saving
paths, give the loss and gradient of the straightforward single forward on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from oel.distill import microbatch
from oel.distill.dataset import schedule, to_records
from oel.distill.trainer import build_trainer
from oel.schemas import DistillRow, Message
from tests.conftest import tiny_params
from tests.integration.test_distill_stage import fixed_batch

# Rows of very different lengths, so a budget splits them and each group drops padding.
BOARDS = ["Board 0. Which move?", "Board 1: " + "ice, " * 40 + "which move?", "Board 2: " + "hole, " * 15 + "move?",
          "Board 3: " + "goal, " * 60 + "move?"]
COMPLETIONS = [[504, 1116, 2], [33, 44, 55, 66, 77, 88], [12, 2], [90, 91, 92, 93]]


def rows() -> list[DistillRow]:
    knowledge = "Knowledge: the goal G is bottom right; go down first."
    return [DistillRow(row_id=f"r{i}", episode_id=f"e{i}", game="frozenlake", turn=0, store=0,
                       prompt=[Message(role="user", content=b)],
                       teacher_prompt=[Message(role="user", content=f"{knowledge}\n{b}")]) for i, b in enumerate(BOARDS)]


def trainer_with(tiny_model, tmp_path, budget: int, **distill):
    params = tiny_params(distill={"batch_size": 4, "max_tokens_per_microbatch": budget, **distill})
    data = rows()
    trainer = build_trainer(copy.deepcopy(tiny_model.model), tiny_model.tokenizer,
                            to_records(data, schedule(len(data), 4, 0)), params.distill, tmp_path / f"ckpt{budget}")
    with torch.no_grad():  # a trained adapter (B starts at zero, which would make every gradient path agree trivially)
        gen = torch.Generator().manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    trainer.current_gradient_accumulation_steps = 1
    batch = fixed_batch(trainer, data, COMPLETIONS, pad=tiny_model.tokenizer.pad_token_id)
    trainer._prepare_inputs = lambda _inputs: batch  # the sampled completions, fixed so both paths see the same
    return trainer, batch


def step(trainer) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, None).item()
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_budgeted_micro_batches_give_the_one_batch_loss_and_gradient(tiny_model, tmp_path):
    whole, batch = trainer_with(tiny_model, tmp_path, budget=0)
    loss, grads = step(whole)
    lengths = microbatch.row_lengths(batch)
    budget = max(lengths) + 10  # the longest row alone; the others pair up
    split, _ = trainer_with(tiny_model, tmp_path, budget=budget)
    groups = microbatch.plan(lengths, budget)
    assert 1 < len(groups) < len(lengths)  # the test has teeth: several forwards, some with 2 rows
    assert all(len(g) * max(lengths[i] for i in g) <= budget or len(g) == 1 for g in groups)
    split_loss, split_grads = step(split)
    assert split_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == split_grads.keys() and any(g.abs().max() > 0 for g in grads.values())
    for name, g in grads.items():
        assert torch.allclose(split_grads[name], g, rtol=1e-4, atol=1e-7), name
    # The logged statistics (token-weighted sums) are the same too.
    assert torch.allclose(split._stats, whole._stats, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model, tmp_path):
    plain, _ = trainer_with(tiny_model, tmp_path, budget=64, gradient_checkpointing=False)
    loss, grads = step(plain)
    ckpt, _ = trainer_with(tiny_model, tmp_path, budget=64, gradient_checkpointing=True)
    assert ckpt.model.is_gradient_checkpointing
    ckpt_loss, ckpt_grads = step(ckpt)
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(ckpt_grads[name], g, rtol=1e-5, atol=1e-8), name


def test_take_trims_padding_and_keeps_rows_aligned(tiny_model, tmp_path):
    _, batch = trainer_with(tiny_model, tmp_path, budget=0)
    sub = microbatch.take(batch, [0, 2])  # the two shortest rows
    assert sub["prompt_ids"].shape[1] == int(batch["prompt_mask"][[0, 2]].sum(1).max()) < batch["prompt_ids"].shape[1]
    assert sub["completion_ids"].shape[1] == 3 and torch.equal(sub["completion_ids"][0], torch.tensor(COMPLETIONS[0]))
    width = sub["teacher_input_ids"].shape[1] - 3
    assert torch.equal(sub["teacher_input_ids"][:, width:], sub["completion_ids"])  # same completion ids follow
    for i, row in enumerate([0, 2]):  # every real token kept, in order
        real = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()]
        assert torch.equal(sub["teacher_input_ids"][i][sub["teacher_attention_mask"][i].bool()], real)


def test_split_to_makes_exactly_n_groups():
    groups = microbatch.plan([50, 10, 40, 30], 100)
    assert groups == [[0, 2], [3, 1]]  # longest first; 3 x 50 > 100 starts a new group
    assert sorted(len(g) for g in microbatch.split_to(groups, 4)) == [1, 1, 1, 1]
    assert microbatch.plan([5, 6], 0) == [[0, 1]]
    with pytest.raises(ValueError):
        microbatch.split_to(groups, 5)


def test_full_fine_tuning_in_bf16_keeps_fp32_master_weights_and_a_bf16_teacher(tiny_model, tmp_path):
    """The gpu profile's training path (full FT, bf16, checkpointing, token budget) on CPU autocast."""
    params = tiny_params(distill={"method": "full", "bf16": True, "gradient_checkpointing": True,
                                  "max_tokens_per_microbatch": 96, "batch_size": 4, "steps": 1, "learning_rate": 1e-3})
    data = rows()
    model = copy.deepcopy(tiny_model.model).to(torch.bfloat16)  # as model.dtype: bfloat16 loads it
    trainer = build_trainer(model, tiny_model.tokenizer, to_records(data, schedule(len(data), 4, 0)),
                            params.distill, tmp_path / "ckpt")
    assert trainer.teacher_model is not trainer.model
    assert {p.dtype for p in trainer.teacher_model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # AdamW updates are not rounded away
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    loss = trainer.state.log_history[0]["oel/loss"]
    assert loss == loss and abs(loss) < 1e3  # finite
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved
    start = [before[n].to(torch.bfloat16) for n, _ in trainer.model.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(trainer.teacher_model.parameters(), start, strict=True))  # frozen


def test_checkpointing_a_share_of_the_layers_gives_the_same_gradient_and_survives_sampling(tiny_model, tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from oel.distill.layers import checkpointed

    assert [sum(checkpointed(30, s)) for s in (1.0, 0.5, 1 / 3, 0.1)] == [30, 15, 10, 3]
    assert checkpointed(4, 0.5) == [False, True, False, True]  # evenly spaced
    plain, _ = trainer_with(tiny_model, tmp_path, budget=64, gradient_checkpointing=False)
    loss, grads = step(plain)
    part, _ = trainer_with(tiny_model, tmp_path, budget=64, gradient_checkpointing=True, checkpoint_layers=0.5)

    def flags():
        return [bool(m.gradient_checkpointing) for m in part.model.modules() if isinstance(m, GradientCheckpointingLayer)]

    n = len(flags())
    assert flags() == checkpointed(n, 0.5) and 0 < sum(flags()) < n
    part_loss, part_grads = step(part)
    assert part_loss == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(part_grads[name], g, rtol=1e-5, atol=1e-8), name
    # TRL turns checkpointing off and back on in every layer around each generation: the share is restored.
    prompt = tiny_model.tokenizer("Board 0. Which move?")["input_ids"]
    part.generation_config.max_new_tokens = 2
    part._generate_transformers([prompt])
    assert flags() == checkpointed(n, 0.5)

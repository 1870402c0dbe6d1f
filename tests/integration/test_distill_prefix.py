"""Distill speed-ups that must change nothing but the work done (tiny random model): the teacher's cached store
prefixes and the sampler's shared prefix (oel.distill.prefix) and LoRA layers without PEFT's input cast under bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch

from oel.distill.dataset import schedule, to_records
from oel.distill.layers import lora_input_casting
from oel.distill.prefix import TeacherPrefixCache, store_prefixes
from oel.distill.trainer import build_trainer
from oel.models.prompt_cache import MIN_REUSE
from oel.schemas import DistillRow, Message
from tests.conftest import tiny_params
from tests.integration.test_distill_stage import fixed_batch

STORES = ["Knowledge: the goal G is bottom right; go down first, then right, and never step on a hole H.",
          "Knowledge: holes H end the game; walk around them, keep to the frozen tiles and reach G."]
HEADER = "You play a game on a grid. Move one step each turn with [up], [down], [left] or [right]. "
BOARDS = ["Board 0. Which move?", "Board 1: " + "ice, " * 12 + "which move?", "Board 0. Which move?",
          "Board 3: " + "hole, " * 20 + "move?"]
COMPLETIONS = [[504, 1116, 2], [33, 44, 55, 66, 77, 88], [12, 2], [90, 91, 92, 93]]


def rows(stores: list[int]) -> list[DistillRow]:
    return [DistillRow(row_id=f"r{i}", episode_id=f"e{i}", game="frozenlake", turn=0, store=s,
                       prompt=[Message(role="user", content=HEADER + b)],
                       teacher_prompt=[Message(role="user", content=f"{STORES[s]}\n{HEADER}{b}")])
            for i, (b, s) in enumerate(zip(BOARDS, stores, strict=True))]


def trainer_with(tiny_model, tmp_path, data, **distill):
    params = tiny_params(distill={"batch_size": 4, "max_tokens_per_microbatch": 0, **distill})
    trainer = build_trainer(copy.deepcopy(tiny_model.model), tiny_model.tokenizer,
                            to_records(data, schedule(len(data), 4, 0)), params.distill,
                            tmp_path / f"ckpt{len(distill)}")
    with torch.no_grad():  # a trained adapter: the teacher (adapter disabled) then differs from the student
        gen = torch.Generator().manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def step(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad()
    trainer._prepare_inputs = lambda _inputs: batch  # the sampled completions, fixed so both paths see the same
    loss = trainer.training_step(trainer.model, None).item()
    return loss, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def teacher_logits(trainer, batch) -> torch.Tensor:
    d = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, batch)
    return d.teacher_logits


def test_store_prefixes_are_each_stores_shared_tokens():
    a, b = list(range(100, 140)), list(range(200, 250))
    ids = [a + [1, 2], a + [3], b + [4, 5], b + [4, 6], [7] * 40]
    got = store_prefixes(ids, ["g/0", "g/0", "g/1", "g/1", "h/0"])
    # one row alone keeps all but its last token; a prefix under MIN_REUSE tokens is not worth a forward
    assert got == [a, b + [4], [7] * 39]
    assert store_prefixes([[1] * 10 + [2], [1] * 10 + [3]], ["g/0", "g/0"]) == []  # 10 < MIN_REUSE


def test_cached_teacher_logits_are_the_plain_forwards_and_prefill_less(tiny_model, tmp_path):
    data = rows([0, 1, 0, 1])
    trainer = trainer_with(tiny_model, tmp_path, data)
    plain = trainer_with(tiny_model, tmp_path, data, prefix_cache=False)
    batch = fixed_batch(trainer, data, COMPLETIONS, pad=tiny_model.tokenizer.pad_token_id)
    cached = teacher_logits(trainer, batch)
    cache = trainer._teacher_cache
    assert isinstance(cache, TeacherPrefixCache) and plain._teacher_cache is None
    assert len(cache.prefixes) == 2 and min(map(len, cache.prefixes)) >= MIN_REUSE  # one per store
    reference = teacher_logits(plain, batch)
    mask = batch["completion_mask"].bool()
    assert torch.allclose(cached[mask], reference[mask], atol=1e-5), (cached - reference)[mask].abs().max()
    prompt_tokens = int(batch["teacher_attention_mask"].sum() - batch["completion_mask"].sum())
    assert cache.reused > prompt_tokens // 2 and cache.reused + cache.own == prompt_tokens
    # The next step reads the stores' states again: no prefix is recomputed and none piles up.
    entries, computed = len(cache.cache.entries), cache.cache.computed
    again = teacher_logits(trainer, batch)
    assert torch.allclose(again[mask], reference[mask], atol=1e-5)
    assert len(cache.cache.entries) == entries == 2
    assert cache.cache.computed - computed < prompt_tokens // 2  # only the rows 0 and 2 shared turn, once


def test_the_cache_gives_the_uncached_loss_and_gradient_in_micro_batches(tiny_model, tmp_path):
    data = rows([0, 1, 1, 0])
    plain = trainer_with(tiny_model, tmp_path, data, prefix_cache=False, max_tokens_per_microbatch=200)
    batch = fixed_batch(plain, data, COMPLETIONS, pad=tiny_model.tokenizer.pad_token_id)
    loss, grads = step(plain, batch)
    cached = trainer_with(tiny_model, tmp_path, data, max_tokens_per_microbatch=200)
    cached_loss, cached_grads = step(cached, batch)
    assert cached._teacher_cache is not None and cached._teacher_cache.reused > 0
    assert abs(loss) > 1e-4 and cached_loss == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        assert torch.allclose(cached_grads[name], g, rtol=1e-4, atol=1e-7), name


def test_lora_without_the_input_cast_under_autocast_is_bit_identical(tiny_model, tmp_path):
    """The cpu profile's path: a bf16 base, fp32 adapter, bf16 autocast, checkpointing."""
    data = rows([0, 0, 1, 1])
    model = copy.deepcopy(tiny_model.model).to(torch.bfloat16)
    params = tiny_params(distill={"batch_size": 4, "bf16": True, "gradient_checkpointing": True,
                                  "max_tokens_per_microbatch": 200})
    trainer = build_trainer(model, tiny_model.tokenizer, to_records(data, schedule(len(data), 4, 0)),
                            params.distill, tmp_path / "ckpt")
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
    batch = fixed_batch(trainer, data, COMPLETIONS, pad=tiny_model.tokenizer.pad_token_id)
    layers = [m for m in trainer.model.modules() if hasattr(m, "lora_A")]
    assert layers and {m.lora_A["default"].weight.dtype for m in layers} == {torch.float32}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # what train()'s prepared model forwards under
    with lora_input_casting(trainer.model, enabled=True), autocast:
        loss, grads = step(trainer, batch)
    with lora_input_casting(trainer.model, enabled=False), autocast:
        assert not any(m.cast_input_dtype_enabled for m in layers)
        fast_loss, fast_grads = step(trainer, batch)
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored
    assert fast_loss == loss
    assert all(torch.equal(fast_grads[n], g) for n, g in grads.items())


def test_training_in_bf16_samples_with_the_cast_and_leaves_it_on(tiny_model, tmp_path):
    data = rows([0, 1, 0, 1])
    model = copy.deepcopy(tiny_model.model).to(torch.bfloat16)
    params = tiny_params(distill={"batch_size": 2, "steps": 2, "bf16": True, "save_every": 10})
    trainer = build_trainer(model, tiny_model.tokenizer, to_records(data, schedule(len(data), 4, 0)),
                            params.distill, tmp_path / "ckpt")
    trainer.train()  # samples outside autocast between bf16 forwards: a missing cast would be a dtype error
    assert len(trainer.state.log_history) >= 2
    assert all(m.cast_input_dtype_enabled for m in trainer.model.modules() if hasattr(m, "lora_A"))


def test_sampling_with_the_shared_prefix_gives_the_plain_samples(tiny_model, tmp_path):
    from oel.distill.prefix import sampling_inputs

    data = rows([0, 1, 0, 1])
    greedy = {"sampling": {"temperature": 0.0, "max_new_tokens": 6}}
    shared = trainer_with(tiny_model, tmp_path, data, **greedy)
    plain = trainer_with(tiny_model, tmp_path, data, prefix_cache=False, **greedy)
    prompts = shared._tokenize_prompts([record["prompt"] for record in to_records(data, [0, 1, 2, 3])])
    inputs, reused = sampling_inputs(shared.model, prompts, tiny_model.tokenizer.pad_token_id)
    assert "cache" in inputs and reused >= 4 * MIN_REUSE  # the header is prefilled once, not four times
    for trainer in (shared, plain):
        trainer.generation_config.min_new_tokens = 6  # no early EOS: every token is compared
    assert shared._generate_transformers(prompts) == plain._generate_transformers(prompts)
    _, completions = shared._generate_transformers(prompts)
    assert [len(c) for c in completions] == [6] * 4

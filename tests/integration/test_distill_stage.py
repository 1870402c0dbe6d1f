"""The distill stage on the tiny random model: loss plumbing, outputs, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from oel.artifacts import read_json, write_jsonl
from oel.config import Params
from oel.distill import checkpoints
from oel.distill.dataset import chat_ids, schedule, to_records
from oel.distill.trainer import build_trainer
from oel.errors import UserError
from oel.paths import ProjectPaths
from oel.schemas import DistillRow, Message
from oel.stages import distill as stage
from tests.conftest import tiny_params


def make_rows(n: int, knowledge: str | None = "Knowledge: the goal G is bottom right; go down first.") -> list[DistillRow]:
    def teacher(i: int) -> str:
        return f"Board {i}. Which move?" if knowledge is None else f"{knowledge}\nBoard {i}. Which move?"

    return [DistillRow(row_id=f"r{i}", episode_id=f"e{i}", game="frozenlake", turn=0, store=0,
                       prompt=[Message(role="user", content=f"Board {i}. Which move?")],
                       teacher_prompt=[Message(role="user", content=teacher(i))]) for i in range(n)]


def setup_round(project, rows: list[DistillRow]):
    paths = ProjectPaths(project).round("r1")
    write_jsonl(paths.distill_rows, rows)
    return paths


def adapter_tensors(paths) -> dict[str, torch.Tensor]:
    return load_file(str(paths.model / "adapter" / "adapter_model.safetensors"))


def trainer_for(tiny_model, rows, params: Params, tmp_path, **kw):
    import copy

    model = copy.deepcopy(tiny_model.model)
    records = to_records(rows, schedule(len(rows), 4, 0))
    trainer = build_trainer(model, tiny_model.tokenizer, records, params.distill, tmp_path / "ckpt", **kw)
    trainer.model.eval()  # outside train(): no gradient-accumulation scaling, no step metrics
    return trainer


def fixed_batch(trainer, rows, completions: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """A prepared batch with given completions (right-padded), as SDFT's sampler would build it."""
    from oel.distill.dataset import left_pad

    tok = trainer._tokenizer
    p_ids, p_mask = left_pad([chat_ids(tok, [m.model_dump() for m in r.prompt]) for r in rows], pad)
    width = max(len(c) for c in completions)
    c_ids = torch.tensor([c + [pad] * (width - len(c)) for c in completions])
    c_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    teacher = trainer.teacher_context_builder.build(
        None, [[m.model_dump() for m in r.teacher_prompt] for r in rows], c_ids, c_mask)
    return {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask, **teacher}


def test_identical_prompts_give_zero_loss_and_knowledge_gives_nonzero(tiny_model, params, tmp_path):
    completions = [[504, 1116, 2], [33, 44, 55, 66]]
    same = make_rows(2, knowledge=None)
    trainer = trainer_for(tiny_model, same, params, tmp_path)
    loss = trainer.compute_loss(trainer.model, fixed_batch(trainer, same, completions, 2))
    assert abs(loss.item()) < 1e-7
    differ = make_rows(2)
    trainer = trainer_for(tiny_model, differ, params, tmp_path)
    loss = trainer.compute_loss(trainer.model, fixed_batch(trainer, differ, completions, 2))
    assert abs(loss.item()) > 1e-6  # the teacher really sees another prompt


def test_loss_covers_response_tokens_only(tiny_model, params, tmp_path):
    rows = make_rows(2)
    trainer = trainer_for(tiny_model, rows, params, tmp_path)
    batch = fixed_batch(trainer, rows, [[504, 1116, 2], [33, 44, 55, 66, 77]], pad=2)
    base = trainer.compute_loss(trainer.model, batch).item()
    # Rewrite everything outside the response mask (padding after the short reply): the loss must not move.
    changed = {k: v.clone() for k, v in batch.items()}
    changed["completion_ids"][0, 3:] = 9000
    width = changed["teacher_input_ids"].shape[1] - changed["completion_ids"].shape[1]
    changed["teacher_input_ids"][0, width + 3:] = 9000
    assert trainer.compute_loss(trainer.model, changed).item() == pytest.approx(base, abs=1e-7)
    # Whereas changing a response token does move it.
    changed["completion_ids"][0, 1] = 9000
    changed["teacher_input_ids"][0, width + 1] = 9000
    assert trainer.compute_loss(trainer.model, changed).item() != pytest.approx(base, abs=1e-7)


def test_teacher_prompt_is_never_truncated_by_the_student_limit(tiny_model, params, tmp_path):
    rows = make_rows(2, knowledge="Knowledge: " + "the ice is slippery; avoid holes. " * 40)
    trainer = trainer_for(tiny_model, rows, params, tmp_path, max_prompt_tokens=12)
    inputs = to_records(rows, [0, 1])
    batch = trainer._prepare_training_batch(inputs)
    assert batch["prompt_ids"].shape[1] == 12  # the student's limit applies to the student
    full = [len(chat_ids(tiny_model.tokenizer, r["privileged_context"])) for r in inputs]
    assert max(full) > 200
    teacher_prompt_width = batch["teacher_input_ids"].shape[1] - batch["completion_ids"].shape[1]
    assert teacher_prompt_width == max(full)
    assert batch["teacher_attention_mask"][:, :teacher_prompt_width].sum(1).tolist() == full
    # Both score the same completion ids.
    assert torch.equal(batch["teacher_input_ids"][:, teacher_prompt_width:], batch["completion_ids"])


def test_two_steps_change_the_adapter_and_write_a_loadable_policy(project):
    from oel.models import load_model, load_policy

    paths = setup_round(project, make_rows(3))
    summary = stage.run(tiny_params(), paths)
    assert summary["steps_run"] == 2 and summary["kl_first"] is not None
    lora_b = [v for k, v in adapter_tensors(paths).items() if "lora_B" in k]
    assert lora_b and max(t.abs().max().item() for t in lora_b) > 0  # B starts at zero; training moved it
    manifest = read_json(paths.model / "policy.json")
    assert manifest["parent"] == "../base" and manifest["adapter"] == "adapter" and not manifest["merged"]
    assert read_json(paths.model / "train_summary.json")["round"] == "r1"
    with_adapter = load_policy(paths.model, merge=False)
    assert hasattr(with_adapter.model, "peft_config")
    merged = load_model(str(paths.model))
    ids = torch.tensor([[1, 504, 1116]])
    base = load_model("tiny-random")
    assert not torch.allclose(merged.model(ids).logits, base.model(ids).logits)


def test_merge_writes_full_weights_that_load(project):
    from oel.models import load_policy

    paths = setup_round(project, make_rows(2))
    stage.run(tiny_params(distill={"steps": 1, "merge": True}), paths)
    assert read_json(paths.model / "policy.json")["merged"] is True
    assert (paths.model / "model.safetensors").is_file() and (paths.model / "adapter").is_dir()
    assert load_policy(paths.model).model.__class__.__name__ == "LlamaForCausalLM"


def test_full_fine_tuning_writes_merged_weights(project):
    from oel.models import load_policy

    paths = setup_round(project, make_rows(2))
    stage.run(tiny_params(distill={"steps": 1, "method": "full", "learning_rate": 1e-3}), paths)
    manifest = read_json(paths.model / "policy.json")
    assert manifest["merged"] is True and manifest["adapter"] is None
    load_policy(paths.model)


def test_missing_rows_is_a_user_error(project):
    with pytest.raises(UserError, match="consolidate"):
        stage.run(tiny_params(), ProjectPaths(project).round("r1"))


class Killed(Exception):
    pass


@pytest.mark.parametrize(("schedule_", "n_rows"), [("cycle", 5), ("once", 9)])  # once: 2 micro-batches a step
def test_killed_run_resumes_to_the_uninterrupted_result(project, monkeypatch, schedule_, n_rows):
    params = tiny_params(distill={"steps": 4, "save_every": 2, "schedule": schedule_})
    paths = setup_round(project, make_rows(n_rows))
    stage.run(params, paths)
    uninterrupted = adapter_tensors(paths)
    assert read_json(paths.model / "train_summary.json")["resumed_from"] is None

    # Same run from scratch, killed during step 3 (after checkpoint-2 was written).
    import shutil

    shutil.rmtree(paths.checkpoints)
    shutil.rmtree(paths.model)

    def die_at_step_3(step, metrics):
        if step == 3:
            raise Killed

    monkeypatch.setattr(stage, "_track", die_at_step_3)
    with pytest.raises(Killed):
        stage.run(params, paths)
    assert not (paths.model / "policy.json").exists()
    # A checkpoint the kill interrupted mid-save: present on disk but never marked complete.
    half = paths.checkpoints / "checkpoint-3"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"truncated")

    monkeypatch.undo()
    summary = stage.run(params, paths)
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert summary["steps_run"] == 4  # history from before the kill survives the resume
    resumed = adapter_tensors(paths)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6), key
    assert checkpoints.resumable(paths.checkpoints).name == "checkpoint-4"


def test_changed_params_do_not_resume_old_checkpoints(project):
    paths = setup_round(project, make_rows(2))
    stage.run(tiny_params(distill={"steps": 1}), paths)
    summary = stage.run(tiny_params(distill={"steps": 1, "learning_rate": 1e-3}), paths)
    assert summary["resumed_from"] is None


# --- distill.mode: off_policy (the OPCD baseline) and distill.schedule: once ---


def greedy(model, tokenizer, prompt_ids: list[list[int]], max_new: int, eos: list[int]) -> list[list[int]]:
    """Greedy replies through the first EOS, generated the way SDFT batches them (left-padded)."""
    from oel.distill.dataset import left_pad

    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)[:, ids.shape[1]:]
    replies = []
    for row in out.tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        replies.append(row[:ends[0] + 1] if ends else row)
    return replies


def perturb_student(trainer) -> None:
    """Move the training student away from the round-start weights (LoRA B, or every weight in full FT)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and ("lora_B" in name or not hasattr(trainer.model, "peft_config")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_off_policy_completions_are_the_frozen_teachers_on_its_whole_prompt(tiny_model, tmp_path, method):
    params = tiny_params(distill={"mode": "off_policy", "method": method,
                                  "sampling": {"temperature": 0.0, "max_new_tokens": 6}})
    rows = make_rows(2, knowledge="Knowledge: " + "the ice is slippery; avoid holes. " * 10)
    trainer = trainer_for(tiny_model, rows, params, tmp_path, max_prompt_tokens=12)
    perturb_student(trainer)
    inputs = to_records(rows, [0, 1])
    teacher_ids = [chat_ids(tiny_model.tokenizer, r["privileged_context"]) for r in inputs]
    fed = []
    generate = trainer._generate
    trainer._generate = lambda ids: (fed.append(ids), generate(ids))[1]
    batch = trainer._prepare_training_batch(inputs)

    assert fed == [teacher_ids]  # the whole teacher prompt fed generation, not the 12-token student cut
    got = trainer._get_completion_ids_list(batch)
    eos, n = trainer.eos_token_ids, 6
    assert got == greedy(tiny_model.model, tiny_model.tokenizer, teacher_ids, n, eos)  # the round-start model
    student = greedy(trainer.model, tiny_model.tokenizer, teacher_ids, n, eos)
    assert got != student  # the test has teeth: the perturbed student would have said something else
    assert batch["prompt_ids"].shape[1] == 12  # ... and the student is still scored on its own prompt


def test_off_policy_loss_is_the_forward_kl(tiny_model, tmp_path):
    from oel.distill.loss import forward_kl_topk, masked_token_mean, reverse_kl_topk

    rows = make_rows(2)
    trainer = trainer_for(tiny_model, rows, tiny_params(distill={"mode": "off_policy"}), tmp_path)
    batch = fixed_batch(trainer, rows, [[504, 1116, 2], [33, 44, 55, 66]], pad=2)
    logits = trainer._compute_teacher_student_logits(trainer.model, trainer.teacher_model, batch)
    args = (logits.student_logits, logits.teacher_logits, 8, 0.7)
    forward = masked_token_mean(forward_kl_topk(*args), logits.loss_mask).item()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(forward, rel=1e-5)
    assert forward != pytest.approx(masked_token_mean(reverse_kl_topk(*args), logits.loss_mask).item(), rel=1e-3)


def test_off_policy_with_vllm_is_a_user_error(params, tmp_path):
    from types import SimpleNamespace

    dp = params.distill.model_copy(update={"mode": "off_policy"})
    with pytest.raises(UserError, match="applies to on_policy only"):
        build_trainer(None, None, [], dp, tmp_path, args=SimpleNamespace(use_vllm=True))


def test_off_policy_stage_runs_end_to_end(project):
    paths = setup_round(project, make_rows(3))
    summary = stage.run(tiny_params(distill={"mode": "off_policy"}), paths)
    assert summary["mode"] == "off_policy" and summary["steps_run"] == 2
    assert summary["kl_direction"] == "KL(teacher||student)"
    assert all(h["kl"] == h["kl_teacher_student"] and h["kl"] >= 0 for h in summary["history"])
    assert summary["loss_first"] > 0  # the knowledge makes teacher and student differ
    lora_b = [v for k, v in adapter_tensors(paths).items() if "lora_B" in k]
    assert max(t.abs().max().item() for t in lora_b) > 0


def test_once_trains_on_every_row_and_counts_the_padding(project, monkeypatch):
    from oel.distill import sdft as trainer_mod

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen: list[str] = []
    build = trainer_mod._TeacherPromptBuilder.build

    def spy(self, prompts, contexts, *args):
        seen.extend(c[0]["content"].split("\n")[-1] for c in contexts)  # "Board i. Which move?"
        return build(self, prompts, contexts, *args)

    monkeypatch.setattr(trainer_mod._TeacherPromptBuilder, "build", spy)
    paths = setup_round(project, make_rows(5))
    summary = stage.run(tiny_params(distill={"schedule": "once"}), paths)  # 2 steps x batch 2
    assert summary["grad_accum"] == 2 and summary["samples"] == 8 and summary["rows_repeated"] == 3
    assert summary["steps_run"] == 2 and summary["kl_direction"] == "KL(student||teacher)"
    assert len(seen) == 8 and sorted(set(seen[:5])) == [f"Board {i}. Which move?" for i in range(5)]


def test_once_with_too_few_rows_fails_before_loading_the_model(project):
    paths = setup_round(project, make_rows(3))
    with pytest.raises(UserError, match="at least 4 rows"):
        stage.run(tiny_params(distill={"schedule": "once"}), paths)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_bf16_base_trains_with_fp32_trained_weights(project, method):
    """model.dtype auto picks bfloat16 on CPUs that multiply it faster: LoRA trains fp32 adapters on the frozen
    bf16 base; full fine-tuning trains fp32 weights (bf16 master weights would round small updates away)."""
    from oel.models import load_policy

    paths = setup_round(project, make_rows(2))
    params = tiny_params(model={"dtype": "bfloat16"}, distill={"steps": 1, "method": method, "learning_rate": 1e-3})
    summary = stage.run(params, paths)
    assert summary["steps_run"] == 1 and summary["kl_first"] is not None and summary["kl_first"] == summary["kl_first"]
    assert summary["bf16"] is True  # distill.bf16 auto: autocast over a bf16 base
    if method == "lora":
        assert {t.dtype for t in adapter_tensors(paths).values()} == {torch.float32}
    else:
        assert {t.dtype for t in load_file(str(paths.model / "model.safetensors")).values()} == {torch.float32}
    assert load_policy(paths.model, params.model, project).model.dtype == torch.bfloat16

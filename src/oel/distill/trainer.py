"""A distillation run: the trainer's arguments, the schedule's arithmetic, building the trainer, placing the model
on this process's device, training with resume, and saving the weights (whole under FSDP).

The trainer itself, TRL's SDFTTrainer with OEL's prompts, loss and teacher, is oel.distill.sdft.OELDistillTrainer;
it is imported by build_trainer only, so importing this module (as the stage does to plan a run) leaves TRL alone.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oel.config import DistillParams
from oel.distill import checkpoints
from oel.distill.common import HISTORY_PREFIX, StepHook
from oel.distill.common import trl as _trl
from oel.distill.layers import decoder_layers  # noqa: F401  (bench/distill.py reads it from here)
from oel.errors import UserError

log = logging.getLogger(__name__)

# What the logged `kl` measures in each distill.mode: the direction that mode's loss optimises.
KL_DIRECTION = {"on_policy": "KL(student||teacher)", "off_policy": "KL(teacher||student)"}


@dataclass
class TrainResult:
    trainer: Any
    resumed_from: str | None
    state_dict: dict[str, Any] | None = None  # FSDP: the gathered full weights (rank 0), saved instead of shards

    @property
    def history(self) -> list[dict[str, float]]:
        """Per-step metrics of the whole run, including the steps done before a resume."""
        out = []
        for entry in self.trainer.state.log_history:
            metrics = {k.removeprefix(HISTORY_PREFIX): v for k, v in entry.items() if k.startswith(HISTORY_PREFIX)}
            if metrics:
                out.append({"step": entry.get("step"), **metrics})
        return out

    @property
    def model(self):
        return self.trainer.model

    @property
    def is_main(self) -> bool:
        return self.trainer.is_world_process_zero()


def world_size() -> int:
    """Processes in this launch (torchrun/accelerate set WORLD_SIZE), read without initialising torch.distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accum(dp: DistillParams, n_rows: int) -> int:
    """Micro-batches per optimizer step: distill.grad_accum (cycle), or derived from the row count (once).

    once: ceil(rows / (steps x processes x batch_size)), so `steps` optimizer steps see every row.
    """
    if dp.schedule == "cycle":
        return dp.grad_accum
    per_micro_batch = dp.steps * world_size() * dp.batch_size  # rows one micro-batch of every step takes
    if n_rows < per_micro_batch:
        raise UserError(f"distill.schedule: once needs at least {per_micro_batch} rows (distill.steps x "
                        f"batch_size x {world_size()} process(es)), got {n_rows}: lower distill.steps or "
                        "batch_size, or collect more episodes")
    return -(-n_rows // per_micro_batch)


def samples_needed(dp: DistillParams, n_rows: int) -> int:
    """Rows consumed by the whole run: every process takes batch_size rows per micro-step.

    The schedule (dataset.schedule) cycles seeded permutations, so in `once` the first n_rows samples are
    every row exactly once and the rest (fewer than one micro-batch per step) repeat rows to fill the steps.
    """
    return dp.steps * dp.batch_size * grad_accum(dp, n_rows) * world_size()


def _config(dp: DistillParams, output_dir: Path, max_prompt_tokens: int | None, thinking: bool, accum: int,
            vllm_args: dict[str, Any] | None = None):
    """vllm_args: SDFTConfig's vLLM fields (oel.generation.distill_sampling_args); none = transformers."""
    SDFTConfig, _ = _trl()
    sampling = dp.sampling
    greedy = sampling.temperature == 0.0
    use_vllm = bool((vllm_args or {}).get("use_vllm"))
    return SDFTConfig(
        output_dir=str(output_dir), max_steps=dp.steps, num_train_epochs=1,
        per_device_train_batch_size=dp.batch_size, gradient_accumulation_steps=accum,
        # Generate per micro-batch, not per optimizer step (SDFT's default): the weights are the same within
        # a step, and batch_size then bounds generation memory even when `once` derives a large accum.
        steps_per_generation=1,
        # Reference optimiser: AdamW (0.9, 0.999), constant LR, no warmup, grad clip.
        optim="adamw_torch", learning_rate=dp.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=dp.weight_decay, max_grad_norm=dp.max_grad_norm, adam_beta1=0.9, adam_beta2=0.999,
        seed=dp.seed, data_seed=dp.seed, shuffle_dataset=False,
        num_generations=1, max_completion_length=sampling.max_new_tokens,
        generate_from_teacher=dp.mode == "off_policy",
        temperature=1.0 if greedy else sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        generation_kwargs=greedy_kwargs(use_vllm) if greedy else None,
        max_prompt_length=max_prompt_tokens, chat_template_kwargs={"enable_thinking": thinking},
        teacher_model_kind="base", distillation_mode="topk_logits", distillation_topk=dp.top_k,
        distillation_alpha=1.0, distillation_is_clip=None,
        save_strategy="steps", save_steps=dp.save_every, save_total_limit=2, save_only_model=False,
        logging_steps=1, report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=dp.bf16, gradient_checkpointing=dp.gradient_checkpointing, disable_tqdm=False,
        # bf16 autocast on a CPU-only machine (the gpu profile's code path in CI): HF refuses it without use_cpu.
        **({"use_cpu": True} if dp.bf16 and not torch.cuda.is_available() else {}),
        **(vllm_args or {"use_vllm": False}),
    )


def greedy_kwargs(use_vllm: bool) -> dict[str, Any]:
    """SDFTConfig.generation_kwargs for greedy sampling. TRL hands them to transformers' GenerationConfig, or with
    vLLM to vllm.SamplingParams, which has no do_sample (a TypeError) and is greedy at temperature 0; these
    override the temperature SDFT passes (1.0 for greedy, which the GenerationConfig path keeps)."""
    return {"temperature": 0.0} if use_vllm else {"do_sample": False}


def _lora_config(dp: DistillParams):
    from peft import LoraConfig

    lc = dp.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      task_type="CAUSAL_LM", bias="none")


def resolve_bf16(dp: DistillParams, model, compute=None) -> DistillParams:
    """distill.bf16 auto -> true when the model's weights are bfloat16 or `compute` (the dtype this machine
    loads the base model in, oel.models.compute_dtype) is: a later round's fp32 trained weights on a CPU that
    measured bf16 faster train as fast and as small as the first round's."""
    if dp.bf16 != "auto":
        return dp
    return dp.model_copy(update={"bf16": torch.bfloat16 in (model.dtype, compute)})


def frozen_teacher(model, dp: DistillParams):
    """Full fine-tuning's teacher: a frozen copy of the round-start weights, copied before any update; in bf16
    when training in bf16 (it only scores, and holds half the memory of an fp32 copy on the same device)."""
    teacher = copy.deepcopy(model)
    return teacher.to(torch.bfloat16) if dp.bf16 else teacher


def build_trainer(model, tokenizer, records: list[dict[str, Any]], dp: DistillParams, checkpoint_dir: Path, *,
                  thinking: bool = False, max_prompt_tokens: int | None = None, on_step: StepHook | None = None,
                  args=None, accum: int | None = None):
    """The configured OELDistillTrainer (LoRA student via peft_config, or full with a frozen teacher copy)."""
    from datasets import Dataset

    if dp.mode == "off_policy" and args is not None and args.use_vllm:
        # vLLM holds (and re-syncs) the training student's weights, so it cannot sample the frozen teacher.
        raise UserError("distill.mode: off_policy samples from the frozen teacher, which vLLM does not serve; "
                        "generation.backend vllm applies to on_policy only")
    dp = resolve_bf16(dp, model)  # before the frozen teacher, which is bf16 when training in bf16
    # Full fine-tuning needs its own frozen teacher: the round-start weights, copied before any update.
    frozen = frozen_teacher(model, dp) if dp.method == "full" else None
    if dp.method == "full" and model.dtype != torch.float32:
        # bf16 master weights round a 1e-6 AdamW update away; the student trains in fp32 (under bf16 autocast
        # with distill.bf16). LoRA keeps a bf16 base: its frozen weights take no update, its adapter is fp32.
        model = model.float()
    args = args or _config(dp, Path(checkpoint_dir), max_prompt_tokens, thinking, accum or dp.grad_accum)
    from oel.distill.sdft import OELDistillTrainer

    return OELDistillTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
        peft_config=_lora_config(dp) if dp.method == "lora" else None,
        top_k=dp.top_k, kl_temperature=dp.kl_temperature, mode=dp.mode, thinking=thinking, frozen_teacher=frozen,
        on_step=on_step, retention_weight=dp.retention_weight, max_tokens_per_microbatch=dp.max_tokens_per_microbatch,
        checkpoint_layers=dp.checkpoint_layers, prefix_cache=dp.prefix_cache)


def distill(model, tokenizer, records: list[dict[str, Any]], dp: DistillParams, checkpoint_dir: Path,
            fingerprint: dict[str, Any], *, thinking: bool = False, max_prompt_tokens: int | None = None,
            on_step: StepHook | None = None, accum: int | None = None,
            vllm_args: dict[str, Any] | None = None) -> TrainResult:
    """Train the student on the scheduled records; resume from the last complete checkpoint if it matches.

    `accum` is grad_accum(dp, rows) (the default, dp.grad_accum, is right for `cycle` only); `records` must be
    exactly samples_needed(dp, rows) long, so the run ends where the schedule does.
    """
    accum = accum or dp.grad_accum
    dp = resolve_bf16(dp, model)
    # The trainer arguments initialise the process group; a bare PartialState() here would not see it.
    args = _config(dp, Path(checkpoint_dir), max_prompt_tokens, thinking, accum, vllm_args)
    if len(records) != dp.steps * dp.batch_size * accum * args.world_size:
        raise ValueError(f"{len(records)} records for {dp.steps} steps x {dp.batch_size} x {accum} x "
                         f"{args.world_size} processes: build them with samples_needed()")
    with args.main_process_first(desc="checkpoint folder"):  # rank 0 cleans it before the others look
        resume = checkpoints.prepare(Path(checkpoint_dir), {**fingerprint, "world_size": args.world_size})
    if resume is not None:
        log.info("resuming distillation from %s", resume)
    # Before the frozen teacher is copied from it: under a launch every rank loaded onto the current CUDA device
    # (cuda:0 unless set), and the copy would follow it there.
    model = on_rank_device(model, args.device)
    trainer = build_trainer(model, tokenizer, records, dp, checkpoint_dir, thinking=thinking,
                            max_prompt_tokens=max_prompt_tokens, on_step=on_step, args=args, accum=accum)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # FSDP: every rank holds a shard; the weights rank 0 writes are gathered by all ranks together, here.
    state = full_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    return TrainResult(trainer, str(resume) if resume else None, state)


def on_rank_device(model, device):
    """The model on this process's device (TrainingArguments.device: cuda:<local rank> under a launch), moved
    only when it is elsewhere. FSDP and DeepSpeed would place it themselves, but not the teacher copied first."""
    device = torch.device(device)
    current = next(model.parameters()).device
    if current.type == device.type and (device.index is None or current.index == device.index):
        return model
    log.info("moving the model from %s to this process's device %s", current, device)
    return model.to(device)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model on CPU at rank 0, empty on the others. A collective:
    every rank calls it, so rank 0 alone can then save whole weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_weights(result: TrainResult, tokenizer, out_dir: Path, method: str, merge: bool) -> list[str]:
    """Write the adapter (LoRA) and/or merged full weights into out_dir; returns what was written."""
    out_dir = Path(out_dir)
    model = result.trainer.accelerator.unwrap_model(result.model)
    state = result.state_dict  # None: the model's own parameters are whole
    written = []
    if method == "lora":
        model.save_pretrained(str(out_dir / "adapter"), state_dict=state)
        written.append("adapter")
        if not merge:
            return written
        if state is not None:  # rank 0 holds no whole PEFT model to merge; the adapter policy serves as is
            log.warning("distill.merge under FSDP: wrote the adapter only (vLLM and eval merge it when they load it)")
            return written
        model = model.merge_and_unload()  # last use of the PEFT model: merging rewrites it in place
    model.save_pretrained(str(out_dir), state_dict=state)
    tokenizer.save_pretrained(str(out_dir))
    written.append("merged")
    return written


@contextmanager
def teacher_scope(model):
    """Run `model` as the frozen teacher: a PEFT student with its adapter disabled, else unchanged."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None or not hasattr(model, "peft_config"):
        yield model
        return
    with disable():
        yield model


"""On-policy context distillation on TRL's SDFTTrainer: the only module that imports TRL or PEFT.

Why SDFTTrainer (trl.experimental.sdft, TRL 1.16): it already does what OEL's consolidation needs, namely
one fresh student sample per prompt (transformers generate, or vLLM as a setting), a teacher that sees a
different prompt and scores the *same* completion ids, teacher = the student with the LoRA adapter disabled
(`teacher_model_kind="base"`, no second copy), a response mask through the first EOS, PEFT, accelerate
(DDP/FSDP/DeepSpeed), bf16, gradient checkpointing and HF checkpoints with resume. We subclass it and
replace only what differs from the reference (LMOps `oel/`, VeRL `kl_loss_type=full`):

1. Teacher prompt: SDFT builds it as `template.format(prompt, privileged_context)` from the last user
   message and left-truncates it with the student's `max_prompt_length`. We pass the row's own
   `teacher_prompt` messages (rendered by consolidate, knowledge already inserted) as `privileged_context`
   and template them with the same HF chat template, never truncated (`_TeacherPromptBuilder`).
2. Loss: SDFT's `topk_logits` renormalises over the top-k (or adds a tail bucket), mixes divergences by
   `alpha`, optionally applies IS clipping, and averages per sequence then over the batch. We use
   `loss.reverse_kl_topk` (student top-k support, full-vocab softmax, no renorm, exact reverse KL) and
   `loss.masked_token_mean` (token mean over every response token of the micro-batch). IS clipping is off.
3. Temperature: SDFT divides logits by the *sampling* temperature. We score at `kl_temperature`
   (0.7 in the reference, which also samples at 0.7; here the two are separate params).
4. Full fine-tuning: SDFT rebuilds the frozen teacher from `config._name_or_path`, which for round >= 2
   is the base model, not the merged round-start weights. We pass a frozen copy of the start policy.
5. Row order: SDFT's sampler reshuffles per epoch with a generator that resume does not restore. We give
   it the whole run's seeded schedule as one epoch with shuffling off (`dataset.schedule`), so a resumed
   run sees the same rows at the same step; HF restores the RNG that drives sampling.

Differences from the reference that remain: the token mean is per micro-batch and per process (VeRL
means over each micro-batch too, with dynamic micro-batches); one optimizer step per `grad_accum`
micro-batches of `batch_size` rows on every process (the reference takes one step per 128-game batch).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from oel.config import DistillParams
from oel.distill import checkpoints
from oel.distill.dataset import chat_ids, left_pad
from oel.distill.loss import masked_token_mean, reverse_kl_full, reverse_kl_topk

log = logging.getLogger(__name__)

StepHook = Callable[[int, dict[str, float]], None]
HISTORY_PREFIX = "oel/"


def _trl():
    """Import TRL lazily: its experimental package warns on import and pulls heavy modules."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    return SDFTConfig, SDFTTrainer


class _TeacherPromptBuilder:
    """Replaces SDFT's template builder: the teacher prompt is the row's own messages, never truncated."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _ids(self, teacher_prompts: list[list[dict[str, str]]]) -> list[list[int]]:
        tok = self.trainer._tokenizer
        return [chat_ids(tok, msgs, thinking=self.trainer.thinking) for msgs in teacher_prompts]

    def select_generation_prompts(self, prompts, privileged_contexts):
        return list(privileged_contexts)  # only used with generate_from_teacher=True (off-policy variant)

    def build(self, prompts, privileged_contexts, completion_ids, completion_mask) -> dict[str, torch.Tensor]:
        ids, mask = left_pad(self._ids(privileged_contexts), self.trainer._tokenizer.pad_token_id,
                             completion_ids.device)
        return {"teacher_input_ids": torch.cat([ids, completion_ids], dim=1),
                "teacher_attention_mask": torch.cat([mask, completion_mask], dim=1)}


class _StepClock(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._step_started = time.perf_counter()


class _QuietProgress(ProgressCallback):
    """The tqdm step bar without HF's per-step dict dump; our own log line per step replaces it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


class _MarkComplete(TrainerCallback):
    """Runs after the trainer has written every file of a checkpoint: only then is it resumable."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                checkpoints.mark_complete(folder)


def _make_trainer_class():
    _, SDFTTrainer = _trl()

    class OELDistillTrainer(SDFTTrainer):
        """SDFTTrainer with OEL's teacher prompts, loss, KL temperature and frozen full-FT teacher."""

        def __init__(self, *, top_k: int, kl_temperature: float, thinking: bool = False,
                     frozen_teacher=None, on_step: StepHook | None = None, **kwargs):
            # Set before super().__init__: it calls _setup_teacher_model, which reads _frozen_teacher.
            self.top_k, self.kl_temperature, self.thinking = top_k, kl_temperature, thinking
            self._frozen_teacher, self.on_step = frozen_teacher, on_step
            self._stats = torch.zeros(3, dtype=torch.float64)  # sum(loss*tok), sum(kl*tok), tokens
            self._step_started = time.perf_counter()
            super().__init__(**kwargs)
            self.teacher_context_builder = _TeacherPromptBuilder(self)
            self.add_callback(_StepClock(self))
            if self.pop_callback(ProgressCallback) is not None:
                self.add_callback(_QuietProgress())
            self.add_callback(_MarkComplete())

        def _setup_teacher_model(self) -> None:
            if self._frozen_teacher is None:
                return super()._setup_teacher_model()  # LoRA: the student with its adapter disabled
            teacher = self._frozen_teacher.requires_grad_(False).eval()
            self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
            self._frozen_teacher = None

        def _forward_logits(self, model, input_ids, attention_mask, logits_to_keep):
            # Raw logits at the completion positions; the temperature is applied once, in the loss.
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
            if "logits_to_keep" in self.model_kwarg_keys:
                inputs["logits_to_keep"] = logits_to_keep + 1
            logits = model(**inputs).logits
            return logits[:, :-1, :][:, -logits_to_keep:, :]

        def _compute_self_distillation_loss(self, model, inputs, distillation_logits):
            d = distillation_logits
            mask = d.loss_mask
            per_token = reverse_kl_topk(d.student_logits, d.teacher_logits, self.top_k, self.kl_temperature)
            loss = masked_token_mean(per_token, mask)
            if model.training:
                with torch.no_grad():
                    kl = masked_token_mean(reverse_kl_full(d.student_logits, d.teacher_logits,
                                                           self.kl_temperature), mask)
                    tokens = mask.sum().to(loss.dtype)
                    local = torch.stack([loss.detach() * tokens, kl * tokens, tokens]).float()
                    self._stats += self.accelerator.gather(local.unsqueeze(0)).sum(0).double().cpu()
            return loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "grad_norm" in logs:  # a training-step log, not the end-of-train summary
                # Stored in state.log_history, which checkpoints carry: a resumed run keeps its history.
                logs = {**logs, **{f"{HISTORY_PREFIX}{k}": v for k, v in self._report_step(logs).items()}}
            super().log(logs, start_time)

        def _report_step(self, logs: dict[str, float]) -> dict[str, float]:
            loss_tok, kl_tok, tokens = self._stats.tolist()
            self._stats.zero_()
            seconds = max(time.perf_counter() - self._step_started, 1e-9)
            metrics = {"loss": loss_tok / max(tokens, 1.0), "kl": kl_tok / max(tokens, 1.0),
                       "grad_norm": float(logs.get("grad_norm") or 0.0), "response_tokens": tokens,
                       "tokens_per_s": tokens / seconds, "step_seconds": seconds}
            if self.is_world_process_zero():
                log.info("distill step %d/%d loss=%.4f kl=%.4f grad_norm=%.3f tokens=%d %.1f tok/s",
                         self.state.global_step, self.state.max_steps, metrics["loss"], metrics["kl"],
                         metrics["grad_norm"], tokens, metrics["tokens_per_s"])
                if self.on_step is not None:
                    self.on_step(self.state.global_step, metrics)
            return metrics

    return OELDistillTrainer


@dataclass
class TrainResult:
    trainer: Any
    resumed_from: str | None

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


def samples_needed(dp: DistillParams) -> int:
    """Rows consumed by the whole run: every process takes batch_size rows per micro-step."""
    return dp.steps * dp.batch_size * dp.grad_accum * world_size()


def _config(dp: DistillParams, output_dir: Path, max_prompt_tokens: int | None, thinking: bool):
    SDFTConfig, _ = _trl()
    sampling = dp.sampling
    greedy = sampling.temperature == 0.0
    return SDFTConfig(
        output_dir=str(output_dir), max_steps=dp.steps, num_train_epochs=1,
        per_device_train_batch_size=dp.batch_size, gradient_accumulation_steps=dp.grad_accum,
        # Reference optimiser: AdamW (0.9, 0.999), constant LR, no warmup, grad clip.
        optim="adamw_torch", learning_rate=dp.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=dp.weight_decay, max_grad_norm=dp.max_grad_norm, adam_beta1=0.9, adam_beta2=0.999,
        seed=dp.seed, data_seed=dp.seed, shuffle_dataset=False,
        num_generations=1, max_completion_length=sampling.max_new_tokens,
        temperature=1.0 if greedy else sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        generation_kwargs={"do_sample": False} if greedy else None,
        max_prompt_length=max_prompt_tokens, chat_template_kwargs={"enable_thinking": thinking},
        teacher_model_kind="base", distillation_mode="topk_logits", distillation_topk=dp.top_k,
        distillation_alpha=1.0, distillation_is_clip=None,
        save_strategy="steps", save_steps=dp.save_every, save_total_limit=2, save_only_model=False,
        logging_steps=1, report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=dp.bf16, gradient_checkpointing=dp.gradient_checkpointing, use_vllm=dp.use_vllm,
        disable_tqdm=False,
    )


def _lora_config(dp: DistillParams):
    from peft import LoraConfig

    lc = dp.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      task_type="CAUSAL_LM", bias="none")


def build_trainer(model, tokenizer, records: list[dict[str, Any]], dp: DistillParams, checkpoint_dir: Path, *,
                  thinking: bool = False, max_prompt_tokens: int | None = None, on_step: StepHook | None = None,
                  args=None):
    """The configured OELDistillTrainer (LoRA student via peft_config, or full with a frozen teacher copy)."""
    from datasets import Dataset

    # Full fine-tuning needs its own frozen teacher: the round-start weights, copied before any update.
    frozen = copy.deepcopy(model) if dp.method == "full" else None
    return _make_trainer_class()(
        model=model, args=args or _config(dp, Path(checkpoint_dir), max_prompt_tokens, thinking),
        train_dataset=Dataset.from_list(records), processing_class=tokenizer,
        peft_config=_lora_config(dp) if dp.method == "lora" else None,
        top_k=dp.top_k, kl_temperature=dp.kl_temperature, thinking=thinking, frozen_teacher=frozen,
        on_step=on_step)


def distill(model, tokenizer, records: list[dict[str, Any]], dp: DistillParams, checkpoint_dir: Path,
            fingerprint: dict[str, Any], *, thinking: bool = False, max_prompt_tokens: int | None = None,
            on_step: StepHook | None = None) -> TrainResult:
    """Train the student on the scheduled records; resume from the last complete checkpoint if it matches."""
    # The trainer arguments initialise the process group; a bare PartialState() here would not see it.
    args = _config(dp, Path(checkpoint_dir), max_prompt_tokens, thinking)
    with args.main_process_first(desc="checkpoint folder"):  # rank 0 cleans it before the others look
        resume = checkpoints.prepare(Path(checkpoint_dir), {**fingerprint, "world_size": args.world_size})
    if resume is not None:
        log.info("resuming distillation from %s", resume)
    trainer = build_trainer(model, tokenizer, records, dp, checkpoint_dir, thinking=thinking,
                            max_prompt_tokens=max_prompt_tokens, on_step=on_step, args=args)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return TrainResult(trainer, str(resume) if resume else None)


def save_weights(result: TrainResult, tokenizer, out_dir: Path, method: str, merge: bool) -> list[str]:
    """Write the adapter (LoRA) and/or merged full weights into out_dir; returns what was written."""
    out_dir = Path(out_dir)
    model = result.trainer.accelerator.unwrap_model(result.model)
    written = []
    if method == "lora":
        model.save_pretrained(str(out_dir / "adapter"))
        written.append("adapter")
        if not merge:
            return written
        model = model.merge_and_unload()  # last use of the PEFT model: merging rewrites it in place
    model.save_pretrained(str(out_dir))
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

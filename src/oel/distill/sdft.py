"""OELDistillTrainer: TRL's SDFTTrainer with what OEL's consolidation changes (imported only when a
trainer is built, by oel.distill.trainer.build_trainer: TRL is slow to import and warns).

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
6. Generation runs per micro-batch (`steps_per_generation=1`; SDFT generates a whole optimizer step's rows
   at once). Same weights within a step, so the same distribution; generation memory stays bounded by
   batch_size even when `schedule: once` derives a large accumulation.
7. `mode: off_policy`, the OPCD off-policy context-distillation baseline: the frozen round-start teacher,
   with the knowledge in its prompt, samples the response and the student is trained on those tokens with
   `loss.forward_kl_topk` (teacher top-k support; the reference's `on_policy_merge=False`). SDFT's
   `generate_from_teacher` only switches the *prompt* and still samples from the training student, so we
   also route generation to the teacher (`_generate_transformers`: the adapter disabled under LoRA, the
   frozen copy under full FT), and tokenize the teacher prompt whole. vLLM is refused there: it serves the
   student's weights.
8. Memory: each micro-step's rows run in token-budgeted groups (`distill.max_tokens_per_microbatch`,
   oel.distill.microbatch), weighted to the one-batch gradient; full FT in bf16 keeps fp32 master weights
   and a frozen bf16 teacher copy (docs/distill.md). The teacher forward runs before the student's.
9. Speed, same results: the frozen teacher's store prefixes are computed once per run and the sampler's shared
   prompt prefix once per call (`distill.prefix_cache`, oel.distill.prefix); under bf16 autocast the LoRA
   layers skip PEFT's input cast (`lora_input_casting`, bit-identical). docs/distill.md has the measurements.
10. Colocated vLLM with a LoRA student: TRL syncs the weights by merging the adapter into the base in place
   and unmerging it, which in bf16 rounds the base (the teacher) a little further at every sync; the merged
   weights are computed beside the base instead (oel.distill.vllm_sync).

Differences from the reference that remain: the token mean is per micro-batch and per process (VeRL
means over each micro-batch too, with dynamic micro-batches); one optimizer step per `grad_accum`
micro-batches of `batch_size` rows on every process (the reference takes one step per 128-game batch;
`schedule: once` derives the accumulation so that `steps` steps use every row once, the last micro-batches
padded with repeated rows). In off_policy the reference generates the teacher's responses once, offline,
and trains on the stored tokens; we sample them from the same frozen teacher at each step, which is the
same distribution (only the random draw differs) and needs no second pass or token store. The reference's
teacher also *plays* those games, so its states are the teacher's own; ours are the rows' user-side states
(played without knowledge) with the teacher answering each turn. The logged `kl`
is the exact full-vocabulary KL in the direction the mode optimises (KL_DIRECTION); both directions are
logged as `kl_student_teacher` and `kl_teacher_student`.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from oel.distill import checkpoints, microbatch, prefix, vllm_sync
from oel.distill.common import HISTORY_PREFIX, StepHook
from oel.distill.common import trl as _trl
from oel.distill.dataset import chat_ids, left_pad
from oel.distill.layers import lora_input_casting, partial_checkpointing
from oel.distill.loss import forward_kl_topk, kl_full_both, masked_token_mean, reverse_kl_topk, with_retention
from oel.distill.prefix import TeacherPrefixCache

log = logging.getLogger(__name__)

_, SDFTTrainer = _trl()


class _TeacherPrompts(list):
    """Teacher prompts handed to SDFT's generation path, marked so they are tokenized whole (never cut)."""


class _TeacherPromptBuilder:
    """Replaces SDFT's template builder: the teacher prompt is the row's own messages, never truncated."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _ids(self, teacher_prompts: list[list[dict[str, str]]]) -> list[list[int]]:
        tok = self.trainer._tokenizer
        return [chat_ids(tok, msgs, thinking=self.trainer.thinking) for msgs in teacher_prompts]

    def select_generation_prompts(self, prompts, privileged_contexts):
        return _TeacherPrompts(privileged_contexts)  # only used with generate_from_teacher=True (off_policy)

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



class _PartialCheckpointing(TrainerCallback):
    def __init__(self, share: float):
        self.share = share

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        on, n = partial_checkpointing(model, self.share)
        log.info("gradient checkpointing in %d of %d layers", on, n)


class _MarkComplete(TrainerCallback):
    """Runs after the trainer has written every file of a checkpoint: only then is it resumable."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                checkpoints.mark_complete(folder)



class OELDistillTrainer(SDFTTrainer):
    """SDFTTrainer with OEL's teacher prompts, loss, KL temperature and frozen full-FT teacher."""

    def __init__(self, *, top_k: int, kl_temperature: float, mode: str = "on_policy", thinking: bool = False,
                 frozen_teacher=None, on_step: StepHook | None = None, retention_weight: float = 0.0,
                 max_tokens_per_microbatch: int = 0, checkpoint_layers: float = 1.0,
                 prefix_cache: bool = False, **kwargs):
        # Set before super().__init__: it calls _setup_teacher_model, which reads _frozen_teacher.
        self.top_k, self.kl_temperature, self.mode, self.thinking = top_k, kl_temperature, mode, thinking
        self._frozen_teacher, self.on_step = frozen_teacher, on_step
        self.max_tokens_per_microbatch = max_tokens_per_microbatch
        self.retention_weight, self.checkpoint_layers = retention_weight, checkpoint_layers
        self.prefix_cache, self._teacher_cache = prefix_cache, None
        self._parts = torch.zeros(2, dtype=torch.float64)  # sum(x*tok) of the distill and retention terms
        self._stats = torch.zeros(4, dtype=torch.float64)  # sum(x*tok) of loss, KL(S||T), KL(T||S); tokens
        self._step_started = time.perf_counter()
        super().__init__(**kwargs)
        self.teacher_context_builder = _TeacherPromptBuilder(self)
        self.add_callback(_StepClock(self))
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(_QuietProgress())
        self.add_callback(_MarkComplete())
        if checkpoint_layers < 1.0:
            partial_checkpointing(self.model, checkpoint_layers)
            self.add_callback(_PartialCheckpointing(checkpoint_layers))
        if self.use_vllm:  # a LoRA sync must not round the base, which is also the teacher (vllm_sync)
            vllm_sync.keep_base_exact(self.vllm_generation)

    def _setup_teacher_model(self) -> None:
        if self._frozen_teacher is None:
            return super()._setup_teacher_model()  # LoRA: the student with its adapter disabled
        teacher = self._frozen_teacher.requires_grad_(False).eval()
        if self.is_fsdp_enabled:  # sharded like the student (SDFT's own teacher path)
            from trl.models import prepare_fsdp

            self.teacher_model = prepare_fsdp(teacher, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._frozen_teacher = None

    def _tokenize_prompts(self, prompts):
        if isinstance(prompts, _TeacherPrompts):  # SDFT would cut them to the student's max_prompt_length
            return self.teacher_context_builder._ids(prompts)
        return super()._tokenize_prompts(prompts)

    def train(self, *args, **kwargs):
        # Under bf16 autocast the LoRA layers skip PEFT's input cast (lora_input_casting); sampling, which
        # runs outside autocast, turns it back on, and so does the end of training.
        with lora_input_casting(self.model, enabled=not self.args.bf16):
            return super().train(*args, **kwargs)

    def _compute_teacher_student_logits(self, model, teacher_model, inputs):
        """SDFT's, with the teacher first (its forward's memory is freed before the student's activations
        exist) and, where it applies, from the stores' cached prefix states (oel.distill.prefix)."""
        from trl.experimental.sdft.sdft_trainer import DistillationLogits

        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        width = completion_ids.size(1)
        loss_mask = completion_mask
        if self.num_loss_tokens_to_skip > 0:  # as SDFT: skip the first response tokens in the loss
            positions = torch.arange(width, device=completion_mask.device).unsqueeze(0)
            loss_mask = completion_mask * (positions >= self.num_loss_tokens_to_skip).long()
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            cache = self._teacher_prefixes(teacher_model)
            teacher_ids, teacher_mask = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
            teacher = (cache.logits(teacher_ids, teacher_mask, width) if cache is not None
                       else self._forward_logits(teacher_model, teacher_ids, teacher_mask, width))
        student = self._forward_logits(model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                                       torch.cat([inputs["prompt_mask"], completion_mask], dim=1), width)
        return DistillationLogits(completion_ids=completion_ids, loss_mask=loss_mask, student_logits=student,
                                  teacher_logits=teacher)

    def _teacher_prefixes(self, teacher_model) -> TeacherPrefixCache | None:
        """The run's teacher prefix cache, built at the first teacher forward; None where it does not apply."""
        if self._teacher_cache is not None or not self.prefix_cache:
            return self._teacher_cache
        if prefix.usable(teacher_model, self.accelerator.num_processes):
            data = self.train_dataset
            stores = data["store"] if "store" in data.column_names else [""] * len(data)
            self._teacher_cache = TeacherPrefixCache.for_prompts(
                teacher_model, data["privileged_context"], stores, self.teacher_context_builder._ids,
                self._tokenizer.pad_token_id)
            log.info("teacher prefix cache: %d store prefix(es) of %s tokens", len(self._teacher_cache.prefixes),
                     "/".join(str(len(p)) for p in self._teacher_cache.prefixes) or "no")
        return self._teacher_cache

    def _generate_transformers(self, prompt_ids):
        try:
            with lora_input_casting(self.model, enabled=True):  # sampling runs outside autocast
                return self._sample(prompt_ids)
        finally:  # TRL re-enabled checkpointing in every layer after sampling
            if self.checkpoint_layers < 1.0:
                partial_checkpointing(self.model, self.checkpoint_layers)

    def _sample(self, prompt_ids):
        if not self.generate_from_teacher:
            return self._generate_shared(prompt_ids)
        # SDFT's generate_from_teacher only swaps the prompt: it still samples from model_wrapped, the
        # training student. off_policy samples from the frozen teacher, so it stands in for the call.
        student = self.model_wrapped
        self.model_wrapped = self.teacher_model
        try:
            with self._get_teacher_context_for_self_distillation():  # LoRA: adapter disabled
                return self._generate_shared(prompt_ids)
        finally:
            self.model_wrapped = student

    def _generate_shared(self, prompt_ids):
        """TRL's transformers sampling, with the prompts' shared prefix prefilled once where it applies
        (oel.distill.prefix): the same sampling, less prefill."""
        from trl.models import unwrap_model_for_generation

        if not self.prefix_cache or not prefix.usable(self.model_wrapped, self.accelerator.num_processes):
            return super()._generate_transformers(prompt_ids)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          generation_kwargs=self.generation_kwargs) as model, torch.no_grad()):
            inputs, _ = prefix.sampling_inputs(model, prompt_ids, self._tokenizer.pad_token_id)
            out = model.generate(**inputs, generation_config=self.generation_config)
        eos = set(self.eos_token_ids)
        completions = []
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():  # through the first EOS, as SDFT cuts them
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            completions.append(row[:end])
        return prompt_ids, completions

    def _forward_logits(self, model, input_ids, attention_mask, logits_to_keep):
        # Raw logits at the completion positions; the temperature is applied once, in the loss.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "logits_to_keep" in self.model_kwarg_keys:
            inputs["logits_to_keep"] = logits_to_keep + 1
        logits = model(**inputs).logits
        return logits[:, :-1, :][:, -logits_to_keep:, :]

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Sample once, then forward + backward in token-budgeted micro-batches (oel.distill.microbatch).

        Each group's loss is its token mean weighted by its share of the batch's response tokens, so the
        summed gradient is the whole batch's token mean; budget 0 is SDFT's single forward, unchanged."""
        if not self.max_tokens_per_microbatch:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        batch = self._prepare_inputs(inputs)  # SDFT: generate this micro-step's completions
        groups = microbatch.plan(microbatch.row_lengths(batch), self.max_tokens_per_microbatch)
        if self.accelerator.num_processes > 1:  # same forward count on every process (each may sync)
            count = torch.tensor([len(groups)], device=self.accelerator.device)
            groups = microbatch.split_to(groups, int(self.accelerator.gather(count).max()))
        tokens = batch["completion_mask"].sum(1).float()
        total = tokens.sum().clamp(min=1.0)
        step_loss = torch.zeros((), device=self.accelerator.device)
        deepspeed = self.accelerator.distributed_type == "DEEPSPEED"
        for i, rows in enumerate(groups):
            last = i == len(groups) - 1
            # Gradients of all but the last group stay local; the last one's backward reduces the sum.
            sync = nullcontext() if last or deepspeed else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, microbatch.take(batch, rows)) * (tokens[rows].sum() / total)
                self.accelerator.backward(loss)
            step_loss += loss.detach()
        self._step += 1  # SDFT's generation counter, which its own training_step advances
        return step_loss

    def _compute_self_distillation_loss(self, model, inputs, distillation_logits):
        d = distillation_logits
        mask = d.loss_mask
        kl_topk = forward_kl_topk if self.mode == "off_policy" else reverse_kl_topk
        loss = masked_token_mean(kl_topk(d.student_logits, d.teacher_logits, self.top_k, self.kl_temperature),
                                 mask)
        # retention_weight 0 never runs the extra forward: the loss is the distill term alone, bit for bit.
        retention = self._retention(model, inputs, d, kl_topk) if self.retention_weight else None
        distill, loss = loss, with_retention(loss, retention, self.retention_weight)
        if model.training and retention is not None:
            with torch.no_grad():
                parts = torch.stack([distill.detach(), retention.detach()]) * mask.sum().to(loss.dtype)
                self._parts += self.accelerator.gather(parts.float().unsqueeze(0)).sum(0).double().cpu()
        if model.training:
            with torch.no_grad():
                tokens = mask.sum().to(loss.dtype)
                kls = [masked_token_mean(kl, mask)
                       for kl in kl_full_both(d.student_logits, d.teacher_logits, self.kl_temperature)]
                local = torch.stack([loss.detach() * tokens, *(kl * tokens for kl in kls), tokens]).float()
                self._stats += self.accelerator.gather(local.unsqueeze(0)).sum(0).double().cpu()
        return loss

    def _retention(self, model, inputs, d, kl_topk) -> torch.Tensor:
        """The student WITH the knowledge (teacher prompt + the same completion, adapter on) against the
        frozen teacher's logits already computed on that input: the same top-k KL and token mean."""
        width = inputs["completion_ids"].shape[1]
        student = self._forward_logits(model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], width)
        return masked_token_mean(kl_topk(student, d.teacher_logits, self.top_k, self.kl_temperature), d.loss_mask)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "grad_norm" in logs:  # a training-step log, not the end-of-train summary
            # Stored in state.log_history, which checkpoints carry: a resumed run keeps its history.
            logs = {**logs, **{f"{HISTORY_PREFIX}{k}": v for k, v in self._report_step(logs).items()}}
        super().log(logs, start_time)

    def _report_step(self, logs: dict[str, float]) -> dict[str, float]:
        loss_tok, reverse_tok, forward_tok, tokens = self._stats.tolist()
        self._stats.zero_()
        seconds = max(time.perf_counter() - self._step_started, 1e-9)
        reverse, forward = reverse_tok / max(tokens, 1.0), forward_tok / max(tokens, 1.0)
        # `kl`: the exact full-vocabulary KL in the direction this mode's loss optimises (KL_DIRECTION).
        metrics = {"loss": loss_tok / max(tokens, 1.0), "kl": forward if self.mode == "off_policy" else reverse,
                   "kl_student_teacher": reverse, "kl_teacher_student": forward,
                   "grad_norm": float(logs.get("grad_norm") or 0.0), "response_tokens": tokens,
                   "tokens_per_s": tokens / seconds, "step_seconds": seconds}
        if self.retention_weight:  # both parts of loss = distill + retention_weight x retention
            distill_tok, retention_tok = self._parts.tolist()
            self._parts.zero_()
            metrics.update(loss_distill=distill_tok / max(tokens, 1.0), loss_retention=retention_tok / max(tokens, 1.0))
        if self.is_world_process_zero():
            log.info("distill step %d/%d loss=%.4f kl=%.4f grad_norm=%.3f tokens=%d %.1f tok/s",
                     self.state.global_step, self.state.max_steps, metrics["loss"], metrics["kl"],
                     metrics["grad_norm"], tokens, metrics["tokens_per_s"])
            if self.on_step is not None:
                self.on_step(self.state.global_step, metrics)
        return metrics

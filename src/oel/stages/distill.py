"""distill: consolidate the round's knowledge into the weights by on-policy context distillation.

distill.mode: off_policy runs the OPCD off-policy baseline instead (the teacher samples, forward KL);
distill.schedule: once uses every row exactly once over `steps` steps (train_summary.json counts the
rows repeated to fill the last micro-batches). See oel.distill.trainer for both.

Reads the round-start policy, data/<round>/distill.jsonl and the headroom stage's verdict; writes
models/<round>/ (adapter/ or merged weights, train_summary.json, then policy.json last). With
distill.require_headroom and a verdict of no headroom, nothing trains: models/<round>/ is its start policy
(a manifest naming the start as parent, no adapter) and train_summary.json says why. Checkpoints live in checkpoints/<round>/ so a killed
run resumes. Runs unchanged under `accelerate launch` (only the main process writes files).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from oel.artifacts import file_sha256, write_json
from oel.config import Params
from oel.paths import ProjectPaths, RoundPaths
from oel.schemas import PolicyManifest
from oel.stages._common import load_round_policy

log = logging.getLogger(__name__)


def run(params: Params, paths: RoundPaths) -> dict[str, Any]:
    from oel.distill import trainer
    from oel.distill.dataset import load_rows, schedule, to_records
    from oel.generation import distill_sampling_args
    from oel.models import compute_dtype

    dp = params.distill
    vllm_args = distill_sampling_args(params)  # vllm without the package/CUDA: one line before any work
    start = params.policy_of(paths.round_id)
    if (skip := no_headroom(params, paths)) is not None:
        _ensure_base_manifest(params, paths, start)
        return skipped(paths, start, skip)
    rows = load_rows(paths.distill_rows)
    _ensure_base_manifest(params, paths, start)  # before the fingerprint, which hashes the start manifest
    plan = _plan(dp, len(rows))  # before loading the model: too few rows for `once` is a one-line error
    loaded = load_round_policy(params, paths)
    dp = trainer.resolve_bf16(dp, loaded.model, compute_dtype(params.model, paths.root))
    records = to_records(rows, schedule(len(rows), plan["samples"], dp.seed))
    log.info("distill@%s: %d rows, %d steps x %d micro-batches (%s, %s, %s) from policy %r", paths.round_id,
             len(rows), dp.steps, plan["grad_accum"], dp.mode, dp.schedule, dp.method, start)
    result = trainer.distill(loaded.model, loaded.tokenizer, records, dp, paths.checkpoints,
                             _fingerprint(params, paths, start), thinking=params.model.thinking,
                             max_prompt_tokens=dp.max_prompt_tokens or None, on_step=_track,
                             accum=plan["grad_accum"], vllm_args=vllm_args)
    summary = _summary(params, paths, start, len(rows), result, dp.merge, plan, dp.bf16)
    if result.is_main:
        _write_policy(params, paths, start, result, loaded.tokenizer, dp.merge, summary)
    return summary


def no_headroom(params: Params, paths: RoundPaths) -> str | None:
    """The headroom stage's reason not to train, when distill.require_headroom and it found none."""
    from oel.artifacts import read_json
    from oel.schemas import HeadroomVerdict

    if not params.distill.require_headroom or not paths.headroom.is_file():
        return None
    verdict = read_json(paths.headroom, HeadroomVerdict)
    return None if verdict.headroom else verdict.reason


def skipped(paths: RoundPaths, start: str, reason: str) -> dict[str, Any]:
    """No training: the round's policy is its start policy (same weights), and the summary says why."""
    from oel.models import write_policy

    out = paths.model
    (out / "policy.json").unlink(missing_ok=True)
    summary = {"round": paths.round_id, "from": start, "trained": False, "skipped_reason": reason, "steps_run": 0}
    write_json(out / "train_summary.json", summary)
    write_policy(out, PolicyManifest(parent=f"../{start}", round=paths.round_id))
    log.warning("distill@%s: not trained (%s); %s is its start policy %s", paths.round_id, reason, out, start)
    return summary


def _plan(dp, n_rows: int) -> dict[str, int]:
    """Micro-batches per step and rows the run consumes; rows_repeated counts samples beyond one pass."""
    from oel.distill import trainer

    accum = trainer.grad_accum(dp, n_rows)
    if dp.schedule == "once" and accum != dp.grad_accum:
        log.info("distill.schedule once: %d micro-batches per step from %d rows (distill.grad_accum unused)",
                 accum, n_rows)
    samples = trainer.samples_needed(dp, n_rows)
    return {"grad_accum": accum, "samples": samples, "rows_repeated": max(samples - n_rows, 0)}


def _track(step: int, metrics: dict[str, float]) -> None:
    from oel import tracking

    tracking.log_metrics(metrics, step=step)


def _fingerprint(params: Params, paths: RoundPaths, start: str) -> dict[str, Any]:
    """Everything that shapes the training run: a checkpoint of any other run must not be resumed."""
    start_manifest = ProjectPaths(paths.root).policy_dir(start) / "policy.json"
    return {"round": paths.round_id, "from": start, "model": params.model.model_dump(mode="json"),
            "distill": params.distill.model_dump(mode="json", exclude={"merge", "save_every"}),
            "rows_sha256": _sha256(paths.distill_rows), "start_policy_sha256": _sha256(start_manifest)}


def _sha256(path: Path) -> str | None:
    return file_sha256(path) if Path(path).is_file() else None


def _summary(params: Params, paths: RoundPaths, start: str, n_rows: int, result, merged: bool,
             plan: dict[str, int], bf16: bool) -> dict[str, Any]:
    from oel.distill.trainer import KL_DIRECTION

    hist = result.history
    first, last = (hist[0], hist[-1]) if hist else ({}, {})
    seconds = sum(h["step_seconds"] for h in hist)
    tokens = sum(h["response_tokens"] for h in hist)
    return {"round": paths.round_id, "from": start, "trained": True, "method": params.distill.method,
            "merged": merged or params.distill.method == "full", "mode": params.distill.mode,
            "schedule": params.distill.schedule, "rows": n_rows, **plan, "steps": params.distill.steps,
            "steps_run": len(hist), "resumed_from": result.resumed_from, "bf16": bf16,
            "loss_first": first.get("loss"), "loss_last": last.get("loss"),
            "kl_direction": KL_DIRECTION[params.distill.mode], "kl_first": first.get("kl"), "kl_last": last.get("kl"),
            # With retention on, the two parts of the loss (each step's are in history and MLflow).
            "retention_weight": params.distill.retention_weight,
            **({"loss_distill_last": last.get("loss_distill"), "loss_retention_last": last.get("loss_retention")}
               if params.distill.retention_weight else {}),
            "seconds_per_step": seconds / len(hist) if hist else None,
            "tokens_per_s": tokens / seconds if seconds else None, "history": hist}


def _write_policy(params: Params, paths: RoundPaths, start: str, result, tokenizer, merge: bool,
                  summary: dict[str, Any]) -> None:
    from oel.distill.trainer import save_weights
    from oel.models import write_policy

    out = paths.model
    (out / "policy.json").unlink(missing_ok=True)  # the folder is not a policy until the new manifest lands
    written = save_weights(result, tokenizer, out, params.distill.method, merge)
    write_json(out / "train_summary.json", summary)
    write_policy(out, PolicyManifest(parent=f"../{start}", adapter="adapter" if "adapter" in written else None,
                                     merged="merged" in written, round=paths.round_id))
    log.info("distill@%s: wrote %s (%s)", paths.round_id, out, ", ".join(written))


def _ensure_base_manifest(params: Params, paths: RoundPaths, start: str) -> None:
    """models/<round>/policy.json names ../base as parent; without `oel base` that folder may not exist yet.

    Writes the same manifest `oel base` writes (params.model), so the new policy loads on its own.
    """
    base = ProjectPaths(paths.root).policy_dir("base")
    if start == "base" and not (base / "policy.json").is_file():
        from oel.models import write_policy

        log.info("writing %s/policy.json (model %s) so %s can resolve its parent", base, params.model.name,
                 paths.model)
        write_policy(base, PolicyManifest(model=params.model.name, round="base"))

"""Distill speed and memory: our trainer vs TRL's stock SDFTTrainer (top-k logits), same rows, sizes, machine, one run.

    .venv/bin/python bench/distill.py [--rows data/r1/distill.jsonl] [--steps 4] [--repeats 3]
                                      [--model smollm2-135m-instruct] [--params params.yaml] [--write-report]

Each variant runs in its own fresh subprocess, one after the other, so each peak is its own: load the model,
run `steps` optimizer steps, report response tokens/s over steps 2..N (step 1 pays one-off warm-up costs) and the
process's peak resident memory (resource.getrusage ru_maxrss: imports, model, sampling and training).
`--repeats` runs the pair that many times, alternating (ours, stock, ours, stock, ...), and compares medians:
on these shared 2-core machines one identical variant moved 10-16 s/step and 1.7-2.0 GiB between runs, so one
pair can put either trainer ahead; the report gives every run's range beside the median.

- ours: oel.distill.trainer.build_trainer with params.yaml's distill section (the profile's defaults), steps=N.
- stock: trl.experimental.sdft.SDFTTrainer with its own defaults (top-k logits, alpha 0.5, IS clip, gradient
  checkpointing on, teacher = the base weights with the adapter disabled) and our sizes: batch, response length,
  sampling, one response per prompt (its default is 8), top-k, learning rate, LoRA; no prompt cut (ours cuts none); rows in our order (no reshuffle).
  Its teacher prompt is `{prompt}\\n\\n{privileged_context}`, with privileged_context = the knowledge block our
  teacher prompt inserts, so both teachers read the same tokens, give or take the two joining newlines.

Both load `--model` with params.yaml's model section (its dtype: the cpu profile's measured `auto`), and both
sample exactly `max_new_tokens` per response (EOS suppressed), so a step is the same work in each.

Rows: `--rows` (a project's data/<round>/distill.jsonl; consolidate writes it) or the French demo rows.
Both variants time the same span, a callback's on_step_begin to the step's log, and count response tokens as
SDFT does (completion ids through the first EOS).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START, END = "<!-- distill:start -->", "<!-- distill:end -->"
REPORT = Path("reports/bench.md")
VARIANTS = ("ours", "stock")


def load_rows(path: str | None):
    from oel.distill.dataset import load_rows as read
    from oel.distill.demo import TRAIN_QUESTIONS, rows

    return read(Path(path)) if path else rows(TRAIN_QUESTIONS)


def knowledge_block(student: str, teacher: str) -> str:
    """What the teacher prompt inserts into the student's: the text between their common prefix and suffix."""
    start = 0
    while start < min(len(student), len(teacher)) and student[start] == teacher[start]:
        start += 1
    end = 0
    while end < min(len(student), len(teacher)) - start and student[-1 - end] == teacher[-1 - end]:
        end += 1
    return teacher[start:len(teacher) - end].strip()


def stock_records(rows, order: list[int]) -> list[dict]:
    out = []
    for i in order:
        r = rows[i]
        student = "\n".join(m.content for m in r.prompt if m.role == "user")
        teacher = "\n".join(m.content for m in r.teacher_prompt if m.role == "user")
        out.append({"prompt": [{"role": m.role, "content": m.content} for m in r.prompt],
                    "privileged_context": knowledge_block(student, teacher)})
    return out


class StepTimer:
    """on_step_begin -> the step's log: seconds and response tokens (SDFT's completions/mean_length x rows)."""

    def __init__(self, rows_per_step: int):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.t0 = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "grad_norm" in logs:
                    timer.steps.append({"seconds": time.perf_counter() - timer.t0,
                                        "tokens": logs["completions/mean_length"] * rows_per_step,
                                        "loss": logs.get("loss")})

        self.t0, self.steps, self.callback = time.perf_counter(), [], _CB()


def child(variant: str, args) -> dict:
    import torch

    from oel.config import load_params
    from oel.distill.dataset import schedule, to_records
    from oel.distill.trainer import _lora_config, build_trainer, resolve_bf16
    from oel.models import compute_dtype, load_model

    params = load_params(Path(args.params))
    dp = params.distill.model_copy(update={"steps": args.steps, "save_every": 10 * args.steps, "grad_accum": 1})
    rows = load_rows(args.rows)
    order = schedule(len(rows), args.steps * dp.batch_size, dp.seed)
    loaded = load_model(args.model, params.model.model_copy(update={"name": args.model}), Path("."))
    # As the distill stage resolves it; stock, whose default is bf16 mixed precision, runs it only where ours does.
    dp = resolve_bf16(dp, loaded.model, compute_dtype(params.model))
    timer = StepTimer(dp.batch_size)
    with tempfile.TemporaryDirectory(prefix=f"oel-bench-{variant}-") as out:
        if variant == "ours":
            trainer = build_trainer(loaded.model, loaded.tokenizer, to_records(rows, order), dp, Path(out))
        else:
            from datasets import Dataset

            from oel.distill.trainer import _trl

            SDFTConfig, SDFTTrainer = _trl()
            s = dp.sampling
            config = SDFTConfig(
                output_dir=out, max_steps=dp.steps, per_device_train_batch_size=dp.batch_size,
                gradient_accumulation_steps=1, learning_rate=dp.learning_rate, seed=dp.seed, max_prompt_length=None,
                max_completion_length=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                distillation_topk=dp.top_k, num_generations=1, shuffle_dataset=False, logging_steps=1, save_strategy="no",
                report_to="none", bf16=dp.bf16, dataloader_pin_memory=False, disable_tqdm=True,
                **({"use_cpu": True} if dp.bf16 and not torch.cuda.is_available() else {}))
            trainer = SDFTTrainer(model=loaded.model, args=config, processing_class=loaded.tokenizer,
                                  train_dataset=Dataset.from_list(stock_records(rows, order)),
                                  peft_config=_lora_config(dp))
        # Every response exactly max_new_tokens long (EOS suppressed): each step does the same work in both, so
        # tokens/s compares the trainers, not how soon each sampler happened to stop.
        trainer.generation_config.min_new_tokens = dp.sampling.max_new_tokens
        trainer.add_callback(timer.callback)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    timed = timer.steps[1:] or timer.steps
    seconds = sum(s["seconds"] for s in timed)
    return {"variant": variant, "steps": len(timer.steps), "s_per_step": seconds / len(timed),
            "tokens_per_s": sum(s["tokens"] for s in timed) / seconds, "wall_s": wall,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gradient_checkpointing": checkpointing(trainer.model),
            "max_tokens_per_microbatch": dp.max_tokens_per_microbatch if variant == "ours" else 0,
            "batch_size": dp.batch_size, "max_new_tokens": dp.sampling.max_new_tokens, "top_k": dp.top_k,
            "method": dp.method, "bf16": dp.bf16, "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
            "losses": [s["loss"] for s in timer.steps]}


def checkpointing(model) -> str:
    """off, on (every layer) or on in k of n layers (ours' distill.checkpoint_layers), as it ran."""
    from oel.distill.trainer import decoder_layers

    layers = decoder_layers(model)
    on = sum(bool(m.gradient_checkpointing) for m in layers)
    return "off" if not on else "on" if on == len(layers) else f"{on} of {len(layers)} layers"


def run_variant(variant: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        cmd = [sys.executable, __file__, *argv, "--variant", variant, "--json", fh.name]
        subprocess.run(cmd, check=True)
        return json.loads(Path(fh.name).read_text(encoding="utf-8"))


MEDIANS = ("s_per_step", "tokens_per_s", "peak_rss_mib", "load")


def summarize(runs: list[dict]) -> dict:
    """One variant's runs -> its first run's settings with the median of each measurement and its range."""
    out = dict(runs[0])
    for key in MEDIANS:
        values = sorted(r[key] for r in runs)
        out[key] = statistics.median(values)
        out[f"{key}_range"] = (values[0], values[-1])
    out["runs"] = len(runs)
    return out


def _cell(r: dict, key: str, fmt: str) -> str:
    low, high = r[f"{key}_range"]
    spread = f" ({low:{fmt}}-{high:{fmt}})" if r["runs"] > 1 else ""
    return f"{r[key]:{fmt}}{spread}"


def section(results: dict[str, dict], args, command: str) -> str:
    ours, stock = results["ours"], results["stock"]
    speed, memory = ours["tokens_per_s"] / stock["tokens_per_s"], ours["peak_rss_mib"] / stock["peak_rss_mib"]
    runs = (f"{ours['runs']} runs of each, alternating, medians (range)" if ours["runs"] > 1 else "one run of each")
    rows = "the French demo rows" if not args.rows else f"`{args.rows}`"
    lines = [START, "## distill: our trainer vs TRL's stock SDFTTrainer", "",
             f"Measured {dt.date.today().isoformat()} on {platform.machine()} CPU ({os.cpu_count()} cores, "
             f"{ours['threads']} torch threads; 1-min load average {ours['load']:.1f} / {stock['load']:.1f} at the "
             f"end of each, its own threads included{shared(ours, stock)}), one invocation: {runs}, each run in "
             "its own subprocess, same rows "
             f"({rows}) and sizes: model {args.model}, {ours['method']}, batch {ours['batch_size']}, "
             f"{ours['max_new_tokens']} new tokens, top-k {ours['top_k']}, {args.steps} steps (mean over 2..N).", "",
             f"Command: `{command}`", "",
             "| variant | bf16 autocast | gradient checkpointing | token budget | s/step | response tokens/s | peak RSS |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in (ours, stock):
        budget = r["max_tokens_per_microbatch"] or "one forward"
        lines.append(f"| {r['variant']} | {'on' if r['bf16'] else 'off'} | {r['gradient_checkpointing']} | {budget} | "
                     f"{_cell(r, 's_per_step', '.2f')} | {_cell(r, 'tokens_per_s', '.1f')} | "
                     f"{_cell(r, 'peak_rss_mib', '.0f')} MiB |")
    lines += ["", f"Ratios of the medians, ours / stock: **{speed:.2f}x** response tokens/s, **{memory:.2f}x** "
                  f"peak memory.", END]
    return "\n".join(lines)


def shared(*results: dict) -> str:
    """A note when the load average shows more than the benchmark's own threads running."""
    return "; others ran beside it" if max(r["load"] - r["threads"] for r in results) > 0.5 else ""


def write_section(text: str) -> None:
    old = REPORT.read_text(encoding="utf-8") if REPORT.is_file() else "# Benchmarks\n"
    if START in old and END in old:
        new = old[:old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(REPORT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=None, help="a distill.jsonl (default: the French demo rows)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating; medians compared")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--write-report", action="store_true", help="rewrite the distill section of reports/bench.md")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from oel.env import setup_env

    setup_env(".")
    if args.variant:
        Path(args.json).write_text(json.dumps(child(args.variant, args)), encoding="utf-8")
        return
    argv = ["--steps", str(args.steps), "--model", args.model, "--params", args.params,
            *(["--rows", args.rows] if args.rows else [])]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            r = run_variant(v, argv)
            runs[v].append(r)
            print(f"{v:5s}: {r['s_per_step']:.2f} s/step, {r['tokens_per_s']:.1f} response tokens/s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    results = {v: summarize(rs) for v, rs in runs.items()}
    if args.repeats > 1:
        for r in results.values():
            print(f"{r['variant']:5s} median: {r['s_per_step']:.2f} s/step, {r['tokens_per_s']:.1f} response "
                  f"tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    ours, stock = results["ours"], results["stock"]
    print(f"ours/stock: {ours['tokens_per_s'] / stock['tokens_per_s']:.2f}x tokens/s, "
          f"{ours['peak_rss_mib'] / stock['peak_rss_mib']:.2f}x peak memory")
    if args.write_report:
        write_section(section(results, args, "python bench/distill.py " + " ".join(
            [*argv, "--repeats", str(args.repeats)])))


if __name__ == "__main__":
    main()

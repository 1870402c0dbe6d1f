"""Distill speed on this machine: seconds/step and response tokens/s for the default params.

    .venv/bin/python bench/distill.py [--steps 3] [--model smollm2-135m-instruct]

Uses params.yaml's distill defaults (DistillParams()) on the embedded model with the French demo rows,
prints the numbers and rewrites the distill section of reports/bench.md (between the distill markers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

START, END = "<!-- distill:start -->", "<!-- distill:end -->"
REPORT = Path("reports/bench.md")


def measure(steps: int, model_spec: str) -> dict:
    from oel.config import DistillParams, ModelParams
    from oel.distill.dataset import schedule, to_records
    from oel.distill.demo import TRAIN_QUESTIONS, rows
    from oel.distill.trainer import distill, samples_needed
    from oel.models import load_model

    dp = DistillParams(steps=steps, save_every=10 * steps)
    loaded = load_model(model_spec, ModelParams(name=model_spec), Path("."))
    train = rows(TRAIN_QUESTIONS)
    records = to_records(train, schedule(len(train), samples_needed(dp), dp.seed))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oel-bench-") as ckpt:
        result = distill(loaded.model, loaded.tokenizer, records, dp, Path(ckpt), {"bench": model_spec})
    wall = time.perf_counter() - t0
    hist = result.history[1:] or result.history  # step 1 pays one-off warm-up costs
    secs = sum(h["step_seconds"] for h in hist)
    return {"steps": steps, "batch_size": dp.batch_size, "max_new_tokens": dp.sampling.max_new_tokens,
            "top_k": dp.top_k, "method": dp.method, "s_per_step": secs / len(hist),
            "tokens_per_s": sum(h["response_tokens"] for h in hist) / secs, "wall_s": wall,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "load": os.getloadavg()[0]}


def section(r: dict, model_spec: str, command: str) -> str:
    return "\n".join([
        START, "## distill (on-policy context distillation)", "",
        f"Measured {dt.date.today().isoformat()} on {platform.machine()} CPU ({os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={r['threads'] or 'default'}, 1-min load average {r['load']:.1f} at the end).", "",
        f"Command: `{command}`", "",
        "| model | method | batch | new tokens | top-k | s/step | response tokens/s |",
        "|---|---|---|---|---|---|---|",
        f"| {model_spec} | {r['method']} | {r['batch_size']} | {r['max_new_tokens']} | {r['top_k']} | "
        f"{r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} |", "",
        f"Mean over steps 2..{r['steps']} (step 1 is warm-up); {r['wall_s']:.0f} s wall in all. A step = sample "
        "one response per prompt + student and teacher forwards + backward + AdamW.", END])


def write_section(text: str) -> None:
    old = REPORT.read_text(encoding="utf-8") if REPORT.is_file() else "# Benchmarks\n"
    if START in old and END in old:
        new = old[:old.index(START)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(REPORT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    from oel.env import setup_env

    setup_env(".")
    r = measure(args.steps, args.model)
    print(f"distill: {r['s_per_step']:.2f} s/step, {r['tokens_per_s']:.1f} response tokens/s "
          f"(batch {r['batch_size']}, {r['max_new_tokens']} new tokens, {args.model})")
    write_section(section(r, args.model, f"python bench/distill.py --steps {args.steps} --model {args.model}"))


if __name__ == "__main__":
    main()

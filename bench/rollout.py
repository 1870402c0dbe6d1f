"""Rollout throughput: the same FrozenLake seeds played one episode at a time, then batched at 8/16/32.

    .venv/bin/python bench/rollout.py                       # embedded SmolLM2-135M, 32 seeds, 64 tokens
    .venv/bin/python bench/rollout.py --write-report        # also fills the rollout section of reports/bench.md
    .venv/bin/python bench/rollout.py --without-cache       # adds one-at-a-time and largest batch, no prefix cache

Greedy decoding and a fixed response length (every call generates exactly --max-new-tokens tokens, EOS
suppressed) make every mode do identical work, so the ratio measures the engine and nothing else.
Every ratio compares modes measured in this one run, with the same prefix-cache setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

START, END = "<!-- rollout:start -->", "<!-- rollout:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-calls", type=int, default=2, help="FrozenLake model-call budget (paper: 5)")
    ap.add_argument("--batches", default="1,8,16,32", help="batch sizes; 1 = one episode at a time")
    ap.add_argument("--without-cache", action="store_true",
                    help="also run one-at-a-time and the largest batch with the prefix cache off")
    ap.add_argument("--write-report", action="store_true")
    args = ap.parse_args()

    from oel.config import FrozenLakeParams, GamesParams, ModelParams, SamplingParams
    from oel.env import setup_env
    from oel.games import make_game
    from oel.models import load_model
    from oel.rollout import EpisodeSpec, TransformersBackend, play
    from oel.seeds import episode_seeds

    setup_env(REPO)
    import torch

    loaded = load_model(args.model, ModelParams(name=args.model, device="cpu"), REPO)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    games = GamesParams(frozenlake=FrozenLakeParams(max_calls=args.max_calls))
    specs = [EpisodeSpec("frozenlake", s, "heldout")
             for s in episode_seeds(1234, "frozenlake", "heldout", None, args.episodes)]
    batches = [int(b) for b in args.batches.split(",")]
    modes = [(bs, True) for bs in batches]
    if args.without_cache:
        modes += [(1, False), (max(batches), False)]
    rows = []
    for bs, cache in modes:
        backend = TransformersBackend(loaded, fixed_length=True, prefix_cache=cache)
        t0 = time.perf_counter()
        eps = play(specs, lambda n: make_game(n, games, REPO), backend, sampling, round_id="bench",
                   policy="base", batch_size=bs, seed=0, progress=False)
        wall = time.perf_counter() - t0
        tokens = sum(t.response_tokens for e in eps for t in e.turns)
        turns = sum(len(e.turns) for e in eps)
        rows.append({"batch": bs, "prefix_cache": cache, "episodes": len(eps), "turns": turns, "tokens": tokens,
                     "wall_s": wall, "episodes_per_min": 60 * len(eps) / wall, "tokens_per_s": tokens / wall,
                     "prompt_tokens": backend.prompt_tokens, "prefill_tokens": backend.prefill_tokens,
                     "transcripts": [[t.action for t in e.turns] for e in eps]})
        print(f"batch {bs:>2}, prefix cache {'on ' if cache else 'off'}: {wall:7.1f} s  "
              f"{rows[-1]['episodes_per_min']:6.2f} episodes/min  {rows[-1]['tokens_per_s']:6.1f} tokens/s  "
              f"({turns} turns, {tokens} tokens; prefilled {backend.prefill_tokens} positions for "
              f"{backend.prompt_tokens} prompt tokens)", flush=True)
    for r in rows:
        base = next(b for b in rows if b["batch"] == min(batches) and b["prefix_cache"] == r["prefix_cache"])
        r["ratio"] = r["episodes_per_min"] / base["episodes_per_min"]
        r["same_actions_as_first"] = r["transcripts"] == rows[0]["transcripts"]
    env = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_avg_at_end": os.getloadavg()[0], "python": platform.python_version(), "torch": torch.__version__}
    print(json.dumps({"settings": vars(args), "env": env,
                      "rows": [{k: v for k, v in r.items() if k != "transcripts"} for r in rows]}, indent=1))
    if args.write_report:
        write_report(rows, args, env)


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def write_report(rows: list[dict], args: argparse.Namespace, env: dict) -> None:
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    flags = " --without-cache" if args.without_cache else ""
    cmd = (f"{threads}.venv/bin/python bench/rollout.py --episodes {args.episodes} --max-new-tokens "
           f"{args.max_new_tokens} --max-calls {args.max_calls} --batches {args.batches}{flags} --write-report")
    lines = [START, "## Rollout engine: one episode at a time vs batched lockstep", "",
             f"Command: `{cmd}` (measured {env.get('date', '?')} at commit {env.get('commit', '?')})", "",
             f"Model `{args.model}` (fp32, CPU, {env['torch_threads']} torch threads on {env['cpu_count']} cores), "
             f"FrozenLake 3x3 with a budget of {args.max_calls} model calls per game (paper: 5; cut to keep the "
             f"one-at-a-time run short), the same {args.episodes} held-out seeds in every mode, greedy decoding, "
             f"every call forced to exactly {args.max_new_tokens} new tokens (EOS suppressed) so all modes do "
             "identical work. The ratio compares modes with the same prefix-cache setting, all from this one run. "
             "\"Prefilled\" counts the prompt positions run through the model before decoding (padding included), "
             "out of all prompt tokens.", "",
             "| mode | prefix cache | wall s | episodes/min | generated tokens/s | turns | prefilled / prompt tokens "
             "| ratio vs one-at-a-time | same actions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = "one at a time" if r["batch"] == 1 else f"batched, {r['batch']} parallel"
        ratio = f"{r['ratio']:.2f}x"
        if r["prefix_cache"] and r["batch"] == max(x["batch"] for x in rows):
            ratio = f"**{ratio}**"
        lines.append(f"| {mode} | {'on' if r['prefix_cache'] else 'off'} | {r['wall_s']:.1f} | "
                     f"{r['episodes_per_min']:.2f} | {r['tokens_per_s']:.1f} | {r['turns']} | "
                     f"{r['prefill_tokens']} / {r['prompt_tokens']} | {ratio} | "
                     f"{'yes' if r['same_actions_as_first'] else 'no'} |")
    lines += ["", f"Load average at the end: {env['load_avg_at_end']:.1f} (1-minute; the benchmark's own "
              f"{env['torch_threads']} threads account for up to {env['torch_threads']}).", "",
              "Why a prefix cache: prefill is compute-bound and costs the same per token batched or not, so "
              "without it every batched call re-reads a 277-500-token prompt per row and batching only amortises "
              "decoding (the `off` rows). The transformers backend (`src/oel/models/prompt_cache.py`) reuses "
              "prompt KV states two ways: a lockstep batch shares the chat template and game header (170 of the "
              "277 tokens of a first FrozenLake prompt), computed once and broadcast; and each row's prompt "
              "states are kept after a call, so an episode's next turn prefills only its new action, observation "
              "and question. One-at-a-time play gets the same turn-to-turn reuse, so both sides of the ratio use "
              "the same engine. Logits match plain left padding to ~3e-7 (`tests/integration/test_prefix_cache.py`).", END]
    path = REPO / "reports" / "bench.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    block = "\n".join(lines)
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

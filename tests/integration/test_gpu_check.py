"""scripts/gpu_check.sh's logic end to end on CPU at toy size (the real stage code, a random model built
from the Qwen3 config with the embedded tokenizer), and its verdict: a non-finite loss or a stage that
stayed off the GPU fails the check."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "scripts" / "gpu_check"))

import bundle  # noqa: E402
import gpu_check  # noqa: E402


def test_cpu_dry_run_plays_one_round_through_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_SITE": str(tmp_path / "no-bundle")}
    out = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--work",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]  # every line is JSON: one a stage, then the verdict
    assert [line.get("stage") for line in lines[:-1]] == ["model", *gpu_check.STAGES]
    assert lines[-1] == {"gpu_check": "ok", "failures": [], "record": str(tmp_path / "gpu_check.json")}
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES) and report["verdict"] == "ok"
    assert stages["collect"]["user_episodes"] == 4 and stages["collect"]["generated_tokens"] > 0
    # distill three ways: LoRA, full fine-tuning in token-budgeted groups with a checkpoint at step 2, and the same
    # run again after its later checkpoint was removed: it resumes from step 2 and ends with all 3 steps' history.
    assert stages["distill-lora"]["method"] == "lora" and stages["distill-lora"]["steps"] == 1
    assert stages["distill"]["method"] == "full" and stages["distill"]["steps"] == 3
    assert stages["distill"]["resumed_from"] is None
    assert stages["distill-resume"]["resumed_from"].endswith("checkpoint-2") and stages["distill-resume"]["steps"] == 3
    assert all(math.isfinite(x) for name in ("distill-lora", "distill", "distill-resume")
               for x in stages[name]["losses"])
    assert stages["eval"]["episodes"] == 2
    # The OOD probe ran (its checkers import langdetect, nltk, if-verifiable, immutabledict)
    assert 0.0 <= stages["eval"]["ood"]["instruction_pass"] <= 1.0 and "loglik_nats_per_token" in stages["eval"]["ood"]
    # The stages really wrote the round: trajectories, stores, the full-FT policy, the eval breakdown.
    project = tmp_path / "project"
    for rel in ("data/r1/trajectories.jsonl", "models/r1/policy.json", "reports/r1/eval.json"):
        assert (project / rel).is_file(), rel
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 151936 and config["tie_word_embeddings"]
    assert not (project / "mlruns").exists()  # OEL_TRACKING=off: nothing recorded in MLflow
    # Everything the run imported is on the box or in the bundle (a guarded optional import aside).
    imported = {bundle.canonical(d) for d in report["imports"]["distributions"]}
    assert imported, report["imports"]
    uncovered = imported - set(bundle.BUNDLE) - set(bundle.BOX) - bundle.OPTIONAL
    assert uncovered == set()


def test_the_shipped_config_is_qwen3_1_7b():
    arch = json.loads(gpu_check.CONFIG.read_text())
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["num_attention_heads"],
            arch["num_key_value_heads"], arch["intermediate_size"], arch["vocab_size"], arch["rope_theta"]) == (
        2048, 28, 16, 8, 6144, 151936, 1000000)


def report(losses, peaks, resumed_from="checkpoint-3"):
    stages = {name: {"seconds": 1.0, "peak_gpu_gib": peak} for name, peak in peaks.items()}
    for name in ("distill-lora", "distill", "distill-resume"):
        stages[name].update(losses=[0.1], steps=4, resumed_from=None)
    stages["distill"]["losses"] = losses
    stages["distill-resume"]["resumed_from"] = resumed_from
    return {"stages": stages}


def test_the_verdict_fails_a_non_finite_loss_a_stage_off_the_gpu_no_resume_and_an_error():
    on_gpu = {"collect": 5.0, "extract": 5.0, "consolidate": 0.0, "distill-lora": 9.0, "distill": 30.0,
              "distill-resume": 30.0, "eval": 5.0}
    assert gpu_check.failures(report([0.1, 0.2], on_gpu), "cuda") == []
    assert gpu_check.failures(report([0.1, float("nan")], on_gpu), "cuda") == ["distill loss not finite: [0.1, nan]"]
    assert gpu_check.failures(report([], on_gpu), "cpu")  # no step ran
    assert gpu_check.failures(report([0.1], on_gpu, resumed_from=None), "cpu") == [
        "distill did not resume from its checkpoint: resumed from None, 4 steps in its history"]
    cpu_eval = {**on_gpu, "eval": 0.01}
    assert gpu_check.failures(report([0.1], cpu_eval), "cuda") == [
        "eval peaked at 0.01 GiB of GPU memory: it did not run on CUDA"]
    broken = {"stages": {"collect": {"seconds": 1.0}, "extract": {"seconds": 0.1, "error": "OutOfMemoryError: x"}},
              "error": "OutOfMemoryError: x"}
    assert gpu_check.failures(broken, "cuda") == ["extract failed: OutOfMemoryError: x"]


def test_each_stage_starts_with_memory_freed_and_the_peak_reset(monkeypatch):
    import gc

    import torch

    calls: list[str] = []
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name: calls.append(_n))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: calls.append("memory_allocated") or 2 * gpu_check.GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 7 * gpu_check.GIB)
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc.collect") or 0)
    stats: dict = {}
    assert gpu_check.timed("cuda", lambda: calls.append("stage") or "summary", stats) == "summary"
    assert calls == ["gc.collect", "synchronize", "empty_cache", "memory_allocated", "reset_peak_memory_stats",
                     "stage", "synchronize", "gc.collect", "empty_cache"]
    assert stats["held_before_gib"] == 2.0 and stats["peak_gpu_gib"] == 7.0 and stats["seconds"] >= 0


def test_the_bundle_wheel_list_is_our_pins_for_cpython_3_12():
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    platforms = list(bundle.PLATFORMS) + ["linux_x86_64"]
    cp312 = {*cpython_tags((3, 12), platforms=platforms), *compatible_tags((3, 12), "cp312", platforms=platforms)}
    wheels = bundle.RECORD.read_text().split()
    built = {}
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel)
        assert tags & cp312, f"{wheel} does not install on CPython 3.12 linux x86_64"
        built[canonicalize_name(name)] = str(version)
    assert sorted(f"{n}=={v}" for n, v in built.items()) == sorted(bundle.wheel_specs())
    # The smoke test imports at least one module of every bundled distribution.
    assert all(bundle.BUNDLE.values()) and {m for ms in bundle.BUNDLE.values() for m in ms} <= set(bundle.smoke_modules())


def test_the_smoke_test_stops_at_the_first_missing_module(capsys):
    assert bundle.smoke(["json", "no_such_module_here", "also_missing"]) == 1
    err = capsys.readouterr().err
    assert "'no_such_module_here'" in err and "also_missing" not in err
    assert bundle.smoke(["json"]) == 0


def test_cuda_without_a_gpu_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        return
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().out.startswith("error: --device cuda but torch sees no CUDA device")

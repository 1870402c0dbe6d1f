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

import gpu_check  # noqa: E402


def test_cpu_dry_run_plays_one_round_through_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--work",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "gpu check: ok" in out.stdout and "tokens/s" in out.stdout and "s/step" in out.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["stages"]) == ["collect", "extract", "consolidate", "distill", "eval"]
    assert report["collect"]["user_episodes"] == 4 and report["collect"]["generated_tokens"] > 0
    assert report["distill"]["steps"] == 2 and all(math.isfinite(x) for x in report["distill"]["losses"])
    assert report["eval"]["episodes"] == 2
    # The stages really wrote the round: trajectories, stores, the full-FT policy, the eval breakdown.
    project = tmp_path / "project"
    for rel in ("data/r1/trajectories.jsonl", "models/r1/policy.json", "reports/r1/eval.json"):
        assert (project / rel).is_file(), rel
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 151936 and config["tie_word_embeddings"]
    assert not (project / "mlruns").exists()  # OEL_TRACKING=off: nothing recorded in MLflow


def test_the_shipped_config_is_qwen3_1_7b():
    arch = json.loads(gpu_check.CONFIG.read_text())
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["num_attention_heads"],
            arch["num_key_value_heads"], arch["intermediate_size"], arch["vocab_size"], arch["rope_theta"]) == (
        2048, 28, 16, 8, 6144, 151936, 1000000)


def report(losses, peaks):
    return {"distill": {"losses": losses},
            "stages": {name: {"seconds": 1.0, "peak_gpu_gib": peak} for name, peak in peaks.items()}}


def test_the_verdict_fails_a_non_finite_loss_and_a_stage_off_the_gpu():
    on_gpu = {"collect": 5.0, "extract": 5.0, "consolidate": 0.0, "distill": 30.0, "eval": 5.0}
    assert gpu_check.failures(report([0.1, 0.2], on_gpu), "cuda") == []
    assert gpu_check.failures(report([0.1, float("nan")], on_gpu), "cuda") == ["distill loss not finite: [0.1, nan]"]
    assert gpu_check.failures(report([], on_gpu), "cpu")  # no step ran
    cpu_eval = {**on_gpu, "eval": 0.01}
    assert gpu_check.failures(report([0.1], cpu_eval), "cuda") == [
        "eval peaked at 0.01 GiB of GPU memory: it did not run on CUDA"]


def test_cuda_without_a_gpu_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        return
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().out.startswith("error: --device cuda but torch sees no CUDA device")

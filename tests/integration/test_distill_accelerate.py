"""The same distill stage under `accelerate launch`: 2 CPU processes, gloo, tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oel.artifacts import read_json, write_jsonl
from oel.paths import ProjectPaths
from tests.integration.test_distill_stage import make_rows

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_distill_runs_on_two_cpu_processes(project):
    params = {"model": {"name": "tiny-random"}, "tracking": {"uri": f"sqlite:///{project}/mlruns/mlflow.db"},
              "distill": {"steps": 2, "batch_size": 1, "save_every": 1, "top_k": 8, "sampling": {"max_new_tokens": 4}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    paths = ProjectPaths(project).round("r1")
    write_jsonl(paths.distill_rows, make_rows(4))
    # stage_main without MLflow: every rank would open its own MLflow run (see the distill report); the
    # training itself is what this test scales out.
    entry = project / "launch_distill.py"
    entry.write_text("from oel.stages import distill\nfrom oel.stages._common import stage_main\n"
                     "stage_main('distill', distill.run, 'r1', track=False)\n")
    # `--cpu` alone starts ONE process unless mpirun is set up; torchrun (`--multi_gpu`) with CUDA hidden and
    # ACCELERATE_USE_CPU gives 2 CPU ranks on gloo, which is what a CPU cluster user would run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(entry)]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(paths.model / "train_summary.json")
    assert summary["steps_run"] == 2
    # Two processes x batch 1 per step: every logged step saw both ranks' responses.
    assert all(h["response_tokens"] > 4 for h in summary["history"])
    assert read_json(paths.model / "policy.json")["adapter"] == "adapter"
    fingerprint = read_json(paths.checkpoints / "fingerprint.json")
    assert fingerprint["world_size"] == 2

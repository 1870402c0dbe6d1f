"""Stand-in for `oel <stage> --round r`: writes the stage's outs (paths from oel.paths) in milliseconds,
so flow and DVC wiring tests run the real dvc.yaml graph without models.

    python tests/e2e/standin.py <stage> <round>

OEL_STANDIN_FAIL=<stage>:user  -> prints `error: ...` and exits 2 (a user error: never retried)
OEL_STANDIN_FAIL=<stage>:once  -> exits 1 the first time (a transient failure), succeeds on retry
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

from oel.paths import ProjectPaths


def section_hash(name: str) -> str:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    return hashlib.sha1(json.dumps(raw.get(name), sort_keys=True).encode()).hexdigest()[:8]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def maybe_fail(stage: str) -> None:
    want, _, mode = os.environ.get("OEL_STANDIN_FAIL", "").partition(":")
    if want != stage:
        return
    if mode == "user":
        print(f"error: stand-in {stage} failed on purpose (set by the test)", file=sys.stderr)
        raise SystemExit(2)
    marker = Path(os.environ["OEL_STANDIN_MARKER"])
    if not marker.exists():
        marker.write_text("failed once")
        raise SystemExit(1)


def main(stage: str, round_id: str) -> None:
    maybe_fail(stage)
    project = ProjectPaths(Path("."))
    rp = project.round(round_id)
    start = "base"
    if round_id != "base":
        start = yaml.safe_load(Path("params.yaml").read_text())["rounds"][round_id]["from"]
    if stage == "base":
        write(project.policy_dir("base") / "policy.json", json.dumps({"round": "base"}))
    elif stage == "collect":
        write(rp.trajectories, json.dumps({"policy": start}) + "\n")
    elif stage == "extract":
        write(rp.items, "{}\n")
        write(rp.extract_summary, "{}")
    elif stage == "consolidate":
        write(rp.store("frozenlake", 0), "- item\n")
        write(rp.distill_rows, "{}\n")
    elif stage == "distill":
        # Content follows the distill section, like real weights would.
        write(rp.model / "policy.json", json.dumps({"round": round_id, "parent": f"../{start}",
                                                    "distill": section_hash("distill")}))
    elif stage == "eval":
        write(rp.eval_episodes, "{}\n")
        write(rp.metrics, json.dumps({"pass_rate": 0.5}))
        write(rp.plots / "pass_rate.txt", "plot")
    print(f"stand-in {stage}@{round_id} done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

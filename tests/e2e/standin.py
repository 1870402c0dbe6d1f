"""Stand-in for `oel <stage> --round r`: writes the stage's outs (paths from oel.paths) in milliseconds,
so flow and DVC wiring tests run the real dvc.yaml graph without models.

    python tests/e2e/standin.py <stage> <round>

OEL_STANDIN_FAIL=<stage>:user  -> prints `error: ...` and exits 2 (a user error: never retried)
OEL_STANDIN_FAIL=<stage>:once  -> exits 1 the first time (a transient failure), succeeds on retry
OEL_STANDIN_REGRESS=<round>    -> that round's eval solves nothing (the promotion gate keeps it back)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

from oel.artifacts import write_jsonl
from oel.metrics import OVERALL, dvc_metrics
from oel.paths import ProjectPaths
from oel.plots import curve_row, write_curve
from oel.schemas import Episode, Turn


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


GAMES = ("frozenlake", "sokoban", "textworld")  # every game, whatever params enable: the widest metrics table


def round_chain(round_id: str) -> list[str]:
    """base, then the declared rounds up to round_id: the rows of its curve."""
    order = ["base", *yaml.safe_load(Path("params.yaml").read_text())["rounds"]]
    return order[:order.index(round_id) + 1]


def trained(round_id: str) -> float:
    """A small number that follows the round's distill params (through its stand-in policy), like a real
    eval would: changing distill.* changes the round's metrics."""
    policy = ProjectPaths(Path(".")).policy_dir(round_id) / "policy.json"
    tag = json.loads(policy.read_text()).get("distill", "00") if policy.is_file() else "00"
    return int(tag[:2], 16) / 10_000


def fake_details(step: int, round_id: str) -> dict:
    """eval.json's shape with made-up numbers that move by round (values with 4+ decimals, like real ones)."""
    regressed = os.environ.get("OEL_STANDIN_REGRESS") == round_id
    rate = 0.0 if regressed else 0.123456 + 0.1 * step + trained(round_id)
    held = {game: {"pass_rate": rate, "pass_ci_low": 0.0 if regressed else 0.05, "pass_ci_high": 0.6,
                   "invalid_action_rate": 0.333333 - 0.01 * step, "response_tokens_per_turn": 123.456789 - step,
                   "tokens_per_game": 1234.5, "turns_per_game": 10.0, "episodes": 30, "passed": 4}
            for game in (*GAMES, OVERALL)}
    out: dict = {"heldout": held, "ood": {"instruction_pass": 0.654321, "loglik_nats_per_token": -3.2, "flag": False}}
    if round_id != "base":
        out["teacher"] = {"mean": {g: {**b, "pass_rate": b["pass_rate"] + 0.25} for g, b in held.items()}}
        out["headroom"] = {g: -0.123456 for g in held}
        out["ood"]["instruction_pass_delta"] = -0.054321
    return out


def heldout_episodes(round_id: str) -> list[Episode]:
    """The student's held-out games the gate pairs: 12 of 30 FrozenLake games won, none by a regressed round."""
    won = 0 if os.environ.get("OEL_STANDIN_REGRESS") == round_id else 12
    turn = {"prompt": [], "response": "[right]", "action": "right", "valid": True, "observation": "o",
            "response_tokens": 5}
    return [Episode(episode_id=f"{round_id}-heldout-frozenlake-{seed}", game="frozenlake", seed=seed,
                    split="heldout", round=round_id, policy=round_id, success=seed < won, reward=float(seed < won),
                    feedback="f", turns=[Turn(index=i, **turn) for i in range(2)]) for seed in range(30)]


def eval_outputs(rp, chain: list[str]) -> None:
    """What the real eval writes: the DVC metrics, curve.json (a plots file), eval.json last."""
    details = fake_details(len(chain) - 1, rp.round_id)
    for name, row in dvc_metrics(details).items():
        write(rp.metrics_file(name), json.dumps(row))
    write_curve([curve_row(step, r, fake_details(step, r)) for step, r in enumerate(chain)], rp.plots / "curve.json")
    write(rp.details, json.dumps(details))


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
        write(rp.items, json.dumps({"game": "frozenlake", "store": 0, "step": 0, "source_episode": "e0",
                                    "text": "go right first", "tokens": 4}) + "\n")
        write(rp.extract_summary, "{}")
    elif stage == "consolidate":
        write(rp.store("frozenlake", 0), "- item\n")
        write(rp.distill_rows, "{}\n")
    elif stage == "distill":
        # Content follows the distill section, like real weights would.
        write(rp.model / "policy.json", json.dumps({"round": round_id, "parent": f"../{start}",
                                                    "distill": section_hash("distill")}))
    elif stage == "headroom":
        write(rp.headroom_episodes, "")
        write(rp.headroom, json.dumps({"round": round_id, "start_policy": start, "headroom": True,
                                       "reason": "stand-in: the teacher is better", "episodes_per_game": 0}))
    elif stage == "eval":
        write_jsonl(rp.eval_episodes, heldout_episodes(round_id))
        eval_outputs(rp, round_chain(round_id))
    print(f"stand-in {stage}@{round_id} done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

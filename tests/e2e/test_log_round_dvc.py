"""A round on a chat log under DVC: `rounds.<r>.collect: {source: chatlog, chatlog: PATH}` in params.yaml,
`oel log-round` checks the log, puts it at PATH and runs `dvc repro eval@<r>` (collect reads the log), and
`dvc status` is clean afterwards. A round on a log declared after game rounds reruns none of theirs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.conftest import git, run, use_standins
from tests.e2e.test_dvc_pipeline import ran

pytestmark = pytest.mark.e2e

ROUND_STAGES = ("collect", "extract", "consolidate", "distill", "eval")


def on_log(start: str, log: str) -> dict:
    return {"from": start, "collect": {"source": "chatlog", "chatlog": log}}


def set_params(root, **sections) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for name, value in sections.items():
        raw[name] = value if name == "rounds" else {**raw.get(name, {}), **value}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_log_round_is_dvc_repro_of_a_round_on_a_chat_log_and_leaves_status_clean(clone):
    root = clone({"r1": "base"})
    # As cheap as a round goes: 12 conversations (3 held out), one store, two distill steps, two gap prompts.
    set_params(root, rounds={"r1": on_log("base", "chatlogs/week1.jsonl")},
               collect={"import_heldout_fraction": 0.25},
               extract={"stores": 1, "steps": 1, "sampling": {"max_new_tokens": 8}},
               consolidate={"max_rows": 4},
               distill={"steps": 2, "batch_size": 2, "save_every": 1, "sampling": {"max_new_tokens": 4}},
               eval={"gap_prompts": 2, "sampling": {"max_new_tokens": 4}})
    git(root, "commit", "-qam", "r1 learns from a chat log")
    log = root / "week1-export.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_chat_logs.py"), "--out", str(log), "--n", "12",
                    "--seed", "5"], check=True, capture_output=True)

    done = run(["oel", "log-round", str(log), "--round", "r1"], root, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (root / "chatlogs" / "week1.jsonl").read_bytes() == log.read_bytes()
    assert {f"{s}@r1" for s in ROUND_STAGES} <= ran(done.stdout)
    episodes = [json.loads(x) for x in (root / "data" / "r1" / "trajectories.jsonl").read_text().splitlines()]
    assert len(episodes) == 12 and {e["game"] for e in episodes} == {"chat"}
    assert sum(e["split"] == "heldout" for e in episodes) == 3
    assert json.loads((root / "reports" / "r1" / "eval.json").read_text())["gap"]["prompts"] == 2
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["collect@r1"]
    declared = on_log("base", "chatlogs/week1.jsonl")  # with the log's bytes, as log-round declared them
    declared["collect"]["sha256"] = hashlib.sha256(log.read_bytes()).hexdigest()
    assert lock["params"]["params.yaml"]["rounds.r1"] == declared

    # eval@r1 reads its start policy's eval, so base's eval ran too: every stage of the project is up to date.
    status = run(["dvc", "status", "--json"], root)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    again = run(["dvc", "repro"], root)
    assert again.returncode == 0 and ran(again.stdout) == set()

    # The log edited in place, behind DVC's back: DVC sees nothing, and a forced collect refuses it in one line.
    (root / "chatlogs" / "week1.jsonl").write_bytes(log.read_bytes()[: len(log.read_bytes()) // 2])
    forced = run(["dvc", "repro", "--force", "--single-item", "collect@r1"], root)
    assert forced.returncode != 0 and "the log changed since it was declared" in forced.stdout + forced.stderr


def test_a_round_on_a_log_reruns_no_earlier_game_round(clone):
    root = clone({"r1": "base"})
    use_standins(root)
    assert run(["dvc", "repro"], root).returncode == 0
    (root / "chatlogs").mkdir()
    (root / "chatlogs" / "week1.jsonl").write_text("{}\n")  # stand-in collect does not read it

    set_params(root, rounds={"r1": {"from": "base"}, "r2": on_log("r1", "chatlogs/week1.jsonl")})
    status = run(["dvc", "status", "--json"], root)
    assert set(json.loads(status.stdout)) == {f"{s}@r2" for s in ROUND_STAGES} | (
        {"headroom@r2"} if "headroom:" in (root / "dvc.yaml").read_text() else set())
    second = run(["dvc", "repro"], root)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert not {name for name in ran(second.stdout) if not name.endswith("@r2")}
    assert json.loads(run(["dvc", "status", "--json"], root).stdout) == {}

    # Another log for r2 is another path: r2's collect (and what follows it) reruns, r1's does not.
    set_params(root, rounds={"r1": {"from": "base"}, "r2": on_log("r1", "chatlogs/week2.jsonl")})
    assert set(json.loads(run(["dvc", "status", "--json"], root).stdout)) == {"collect@r2"}

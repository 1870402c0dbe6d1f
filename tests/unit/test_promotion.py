"""The promotion gate on hand-written eval files (no model): the Wilson default, a fixed margin, the OOD block,
`policy: always`, the champion chain, `--from` aliases, and bad input (one line, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oel import promotion, rounds
from oel.config import load_params
from oel.metrics import OVERALL, wilson_interval
from oel.paths import ProjectPaths

BIN = Path(sys.executable).parent


def block(passed: int, n: int = 6) -> dict:
    low, high = wilson_interval(passed, n)
    return {"passed": passed, "episodes": n, "pass_rate": passed / n, "pass_ci_low": low, "pass_ci_high": high}


def evaluated(root: Path, round_id: str, passed: dict[str, int], ood_flag: bool = False, n: int = 6) -> None:
    held = {game: block(k, n) for game, k in passed.items()}
    held[OVERALL] = block(sum(passed.values()), n * len(passed))
    path = ProjectPaths(root).round(round_id).details
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"heldout": held, "ood_flag": ood_flag}))


def project(tmp_path: Path, chain: dict[str, str], **sections) -> Path:
    raw = {"seed": 1, **sections, "rounds": {r: {"from": src} for r, src in chain.items()}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path / "params.yaml"


def gate(params_file: Path, round_id: str) -> dict:
    return promotion.promote(load_params(params_file), params_file.parent, round_id, track=False)


def test_the_wilson_default_tolerates_the_champions_own_noise():
    # The numbers in oel.promotion's docstring.
    assert promotion.allowed_drop(block(3, 6), "wilson") == pytest.approx(0.312, abs=5e-4)
    assert promotion.allowed_drop(block(50, 100), "wilson") == pytest.approx(0.096, abs=5e-4)
    assert promotion.allowed_drop(block(0, 6), "wilson") == 0.0
    assert promotion.allowed_drop(block(3, 6), 0.05) == 0.05


def test_a_drop_beyond_the_champions_interval_is_kept_back(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1", "r3": "r1"})
    evaluated(tmp_path, "base", {"frozenlake": 1, "sokoban": 0})
    evaluated(tmp_path, "r1", {"frozenlake": 3, "sokoban": 0})
    assert gate(params_file, "r1")["decision"] == "champion"
    evaluated(tmp_path, "r2", {"frozenlake": 1, "sokoban": 0})  # 3/6 -> 1/6: a drop of 33.3 > 31.2 points
    kept = gate(params_file, "r2")
    assert (kept["decision"], kept["champion_after"]) == ("challenger", "r1")
    assert kept["reason"] == ("kept back: frozenlake 16.7% vs r1's 50.0% (drop 33.3% > allowed 31.2%); "
                              "r1 stays champion")
    evaluated(tmp_path, "r3", {"frozenlake": 2, "sokoban": 0})  # 2/6 is within r1's noise
    third = gate(params_file, "r3")
    assert (third["champion_before"], third["decision"]) == ("r1", "champion")
    params = load_params(params_file)
    assert promotion.aliases(params, tmp_path) == {"r3": "champion", "r2": "challenger"}
    assert promotion.next_parent(params, tmp_path) == "r3"


def test_a_fixed_margin_and_the_ood_flag(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1"}, promotion={"margin": 0.0})
    evaluated(tmp_path, "base", {"frozenlake": 2})
    evaluated(tmp_path, "r1", {"frozenlake": 1})
    assert gate(params_file, "r1")["decision"] == "challenger"  # margin 0: any drop blocks
    evaluated(tmp_path, "r2", {"frozenlake": 4}, ood_flag=True)
    blocked = gate(params_file, "r2")
    assert blocked["decision"] == "challenger" and "OOD probe is flagged" in blocked["reason"]
    assert promotion.champion(load_params(params_file), tmp_path) == "base"


def test_policy_always_promotes_every_round(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1"}, promotion={"policy": "always"})
    evaluated(tmp_path, "base", {"frozenlake": 6})
    evaluated(tmp_path, "r1", {"frozenlake": 0}, ood_flag=True)
    assert gate(params_file, "r1")["decision"] == "champion"
    evaluated(tmp_path, "r2", {"frozenlake": 0})
    gate(params_file, "r2")
    assert promotion.next_parent(load_params(params_file), tmp_path) == "r2"


def test_a_chat_log_round_has_nothing_to_compare_and_is_promoted_saying_so(tmp_path):
    params_file = project(tmp_path, {"r1": "base"})
    evaluated(tmp_path, "base", {"frozenlake": 3})
    path = ProjectPaths(tmp_path).round("r1").details
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"gap": {"overall": 0.1}}))  # what a log round's eval writes instead of heldout
    record = gate(params_file, "r1")
    assert record["decision"] == "champion" and "nothing to fall below" in record["reason"]
    assert record["pass_rate"] is None


def test_plan_declares_the_next_round_from_the_champion_or_what_from_names(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1"})
    evaluated(tmp_path, "base", {"frozenlake": 1})
    for r, k in (("r1", 4), ("r2", 0)):
        evaluated(tmp_path, r, {"frozenlake": k})
        gate(params_file, r)
    assert rounds.plan(params_file).start_from == "r1"  # r2 regressed: r3 starts from the champion
    assert load_params(params_file).policy_of("r3") == "r1"
    evaluated(tmp_path, "r3", {"frozenlake": 4})
    gate(params_file, "r3")
    picked = rounds.plan(params_file, start_from="challenger")  # an alias, resolved and written as a round
    assert (picked.round_id, picked.start_from) == ("r4", "r2")
    assert "from: r2" in params_file.read_text() and "challenger" not in params_file.read_text()


def test_plan_refuses_an_ungated_or_stale_last_round(tmp_path):
    import os

    params_file = project(tmp_path, {"r1": "base"})
    evaluated(tmp_path, "base", {"frozenlake": 1})
    evaluated(tmp_path, "r1", {"frozenlake": 1})
    before = params_file.read_text()
    with pytest.raises(promotion.PromotionError, match=r"round r1 has no promotion decision.*oel promote --round r1"):
        rounds.plan(params_file)
    assert params_file.read_text() == before
    gate(params_file, "r1")
    assert promotion.undecided(load_params(params_file), tmp_path) == []
    details = ProjectPaths(tmp_path).round("r1").details  # eval reran (dvc repro) after the gate decided
    later = ProjectPaths(tmp_path).round("r1").promotion.stat().st_mtime_ns + 10**9
    os.utime(details, ns=(later, later))
    assert promotion.undecided(load_params(params_file), tmp_path) == ["r1"]
    with pytest.raises(promotion.PromotionError, match="older than eval.json"):
        rounds.plan(params_file)


def oel(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "oel"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("case", "args", "message"), [
    ("unknown alias", ["iterate", "--from", "best"],
     "error: --from 'best' is neither an alias nor a declared round; use champion, challenger, base or one of r1"),
    ("unknown round", ["iterate", "--from", "r7"],
     "error: --from 'r7' is neither an alias nor a declared round; use champion, challenger, base or one of r1"),
    ("alias in params.yaml", ["rounds"],
     "error: params.yaml: (top level): rounds.r2.from: 'champion' is a registry alias, not a round"),
    ("margin out of range", ["promote", "--round", "r1"],
     "error: params.yaml: promotion.margin: 1.5 is not a pass-rate drop: use a number from 0 to 1"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, case, args, message):
    chain = {"r1": "base", "r2": "champion"} if case == "alias in params.yaml" else {"r1": "base"}
    sections = {"promotion": {"margin": 1.5}} if case == "margin out of range" else {}
    project(tmp_path, chain, **sections)
    evaluated(tmp_path, "base", {"frozenlake": 1})
    evaluated(tmp_path, "r1", {"frozenlake": 1})
    before = snapshot(tmp_path)
    done = oel(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert snapshot(tmp_path) == before


def test_oel_rounds_lists_parent_alias_and_decision(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1", "r3": "r1"})
    evaluated(tmp_path, "base", {"frozenlake": 1})
    for r, k in (("r1", 4), ("r2", 0)):
        evaluated(tmp_path, r, {"frozenlake": k})
        gate(params_file, r)
    done = oel("rounds", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:5] == ["round", "from", "alias", "gate", "pass"]
    assert [line.split()[:4] for line in lines[1:4]] == [["r1", "base", "champion", "champion"],
                                                         ["r2", "r1", "challenger", "challenger"],
                                                         ["r3", "r1", "—", "not"]]
    assert "kept back: frozenlake 0.0% vs r1's 66.7%" in lines[2]
    assert lines[-1] == "next round: r3, from r1 (declared)"


def test_the_report_says_why(tmp_path):
    from oel.report import promotion_section

    params_file = project(tmp_path, {"r1": "base", "r2": "r1"})
    evaluated(tmp_path, "base", {"frozenlake": 1})
    for r, k in (("r1", 4), ("r2", 0)):
        evaluated(tmp_path, r, {"frozenlake": k})
        gate(params_file, r)
    text = promotion_section(load_params(params_file), tmp_path, ["base", "r1", "r2"])
    assert "| r1 | base | champion | champion | promoted: no game below base" in text
    assert ("| r2 | r1 | challenger | challenger | kept back: frozenlake 0.0% vs r1's 66.7% (drop 66.7% > allowed "
            "36.7%); r1 stays champion |") in text
    assert text.endswith("Next round: r3, from r1.")

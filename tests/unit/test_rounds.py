"""Round bookkeeping: which round runs next, declaring it without losing comments, the project lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from oel import rounds
from oel.config import load_params
from tests.conftest import REPO


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def finish(root: Path, round_id: str) -> None:
    """Evaluated and promoted by the gate (the lifecycle folds champion_after; tests/unit/test_promotion.py)."""
    from oel.rounds.records import Decision, write_decision

    details = root / "reports" / round_id / "eval.json"
    details.parent.mkdir(parents=True)
    details.write_text("{}")
    write_decision(details.parent / "promotion.json", Decision(
        round=round_id, **{"from": "base"}, policy="gate", alpha=0.05, champion_before="base", decision="champion",
        champion_after=round_id, reason="promoted"))


def test_next_round_id():
    assert rounds.next_round_id(["r1"]) == "r2"
    assert rounds.next_round_id(["r1", "r2", "r10"]) == "r11"
    assert rounds.next_round_id([]) == "r1"
    with pytest.raises(rounds.RoundError, match="must look like r1"):
        rounds.round_number("round1")


def test_plan_picks_the_first_round_without_metrics(proj):
    picked = rounds.plan(proj / "params.yaml")
    assert (picked.round_id, picked.start_from, picked.declared_now) == ("r1", "base", False)
    assert "r2" not in load_params(proj / "params.yaml").rounds


def test_plan_declares_the_next_round_from_the_last(proj):
    finish(proj, "r1")
    picked = rounds.plan(proj / "params.yaml")
    assert (picked.round_id, picked.start_from, picked.declared_now) == ("r2", "r1", True)
    assert load_params(proj / "params.yaml").policy_of("r2") == "r1"
    finish(proj, "r2")
    assert rounds.plan(proj / "params.yaml").start_from == "r2"


def test_declaring_keeps_comments_and_layout(proj):
    before = (proj / "params.yaml").read_text()
    rounds.declare_round(proj / "params.yaml", "r2", "r1")
    after = (proj / "params.yaml").read_text()
    assert after == before.replace("rounds:\n  r1:\n    from: base\n",
                                   "rounds:\n  r1:\n    from: base\n  r2:\n    from: r1\n")
    assert "# OEL parameters" in after


def test_explicit_round(proj):
    finish(proj, "r1")
    assert rounds.plan(proj / "params.yaml", "r1").declared_now is False  # rerun a done round: DVC decides
    with pytest.raises(rounds.RoundError, match="neither declared nor the next round"):
        rounds.plan(proj / "params.yaml", "r5")
    assert rounds.plan(proj / "params.yaml", "r2").declared_now is True


def test_declaring_twice_is_refused(proj):
    with pytest.raises(rounds.RoundError, match="already declared"):
        rounds.declare_round(proj / "params.yaml", "r1", "base")


HOLD = textwrap.dedent("""
    import sys, time
    from oel.rounds import iteration_lock
    with iteration_lock(sys.argv[1], timeout=5):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold_lock(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_iteration_fails_clearly_while_the_first_holds_the_lock(tmp_path):
    holder = hold_lock(tmp_path, 30)
    try:
        with pytest.raises(rounds.IterationBusy, match=rf"another oel iteration is running .*pid {holder.pid}"):
            with rounds.iteration_lock(tmp_path, timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    with rounds.iteration_lock(tmp_path, timeout=5):  # a killed holder leaves no stale lock
        pass


def test_second_iteration_waits_for_the_first(tmp_path):
    holder = hold_lock(tmp_path, 1.5)
    start = time.monotonic()
    with rounds.iteration_lock(tmp_path, timeout=20):
        waited = time.monotonic() - start
    assert 1.0 < waited < 20  # got the lock only once the holder let go, well before the timeout
    holder.wait()


@pytest.mark.parametrize(("before", "after"), [
    ("rounds: {r1: {from: base}}  # chain\nseed: 1\n", "rounds: {r1: {from: base}, r2: {from: r1}} # chain\nseed: 1\n"),
    ("rounds:\n  r1:\n    from: base  # first\n  # next\n\nseed: 1\n",
     "rounds:\n  r1:\n    from: base  # first\n  r2:\n    from: r1\n  # next\n\nseed: 1\n"),
])
def test_declaring_keeps_flow_style_and_inline_comments(tmp_path, before, after):
    (tmp_path / "params.yaml").write_text(before)
    rounds.declare_round(tmp_path / "params.yaml", "r2", "r1")
    assert (tmp_path / "params.yaml").read_text() == after

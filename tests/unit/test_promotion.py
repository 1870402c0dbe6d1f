"""The promotion gate on hand-written evals (no model): every headline metric paired on the same held-out seeds,
the margins, `policy: always`, untrained rounds, the champion chain, force and rollback, `oel rounds`, the
report, and bad input (one line, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oel import rounds
from oel.artifacts import write_jsonl
from oel.config import load_params
from oel.metrics import by_game
from oel.paths import ProjectPaths
from oel.rounds import lifecycle
from oel.rounds.gate import describe
from oel.schemas import Episode, Turn

BIN = Path(sys.executable).parent
N = 100  # held-out games per game, as in the cpu profile


def episode(round_id: str, game: str, seed: int, won: bool, invalid: int = 0, turns: int = 2,
            tokens: int = 40) -> Episode:
    return Episode(episode_id=f"{round_id}-heldout-{game}-{seed}", game=game, seed=seed, split="heldout",
                   round=round_id, policy=round_id, success=won, reward=float(won), feedback="f",
                   turns=[Turn(index=i, prompt=[], response="r", action="a", observation="o", valid=i >= invalid,
                               response_tokens=tokens) for i in range(turns)])


def evaluated(root: Path, round_id: str, won: int = 0, invalid: int = 0, tokens: int = 40, game: str = "frozenlake",
              ood_failed: int | None = 3, loglik: float = -3.0, n: int = N) -> None:
    """A round's eval: `won` of n games won (the first seeds), `invalid` invalid turns of 2 in every game,
    `tokens` per turn; the probe's 20 prompts with the first `ood_failed` failed."""
    eps = [episode(round_id, game, seed, seed < won, invalid, tokens=tokens) for seed in range(n)]
    rp = ProjectPaths(root).round(round_id)
    write_jsonl(rp.eval_episodes, eps)
    details = {"heldout": by_game(eps)}
    if ood_failed is not None:
        ids = [f"p{i}" for i in range(20)]
        details["ood"] = {"source": "probe", "instruction_pass": (20 - ood_failed) / 20, "prompt_ids": ids,
                          "failed": ids[:ood_failed], "loglik_nats_per_token": loglik}
    rp.details.parent.mkdir(parents=True, exist_ok=True)
    rp.details.write_text(json.dumps(details))


def project(tmp_path: Path, chain: dict[str, str], **sections) -> Path:
    raw = {"seed": 1, **sections, "rounds": {r: {"from": src} for r, src in chain.items()}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return tmp_path / "params.yaml"


def gate(params_file: Path, round_id: str):
    return lifecycle.promote(load_params(params_file), params_file.parent, round_id)


def blocking(decision) -> dict[str, object]:
    return {f"{c.game} {c.metric}": c for c in decision.checks if c.blocked}


def test_a_tied_pass_rate_with_more_invalid_actions_is_kept_back_naming_the_metric(tmp_path):
    # The make-run case: both solve 0/100, the invalid-action rate rises from 90.5% to 99%.
    params_file = project(tmp_path, {"r1": "base"})
    evaluated(tmp_path, "base", won=0)
    rp = ProjectPaths(tmp_path).round("base")
    eps = [episode("base", "frozenlake", s, False, invalid=2 if s % 10 else 1) for s in range(N)]  # 95%
    write_jsonl(rp.eval_episodes, eps)
    evaluated(tmp_path, "r1", won=0, invalid=2)  # every turn invalid
    decision = gate(params_file, "r1")
    assert (decision.decision, decision.champion_after) == ("challenger", "base")
    assert list(blocking(decision)) == ["frozenlake invalid_action_rate"]
    check = blocking(decision)["frozenlake invalid_action_rate"]
    assert check.candidate == 1.0 and check.champion == pytest.approx(0.95) and check.ci_low > 0
    assert check.test == "paired bootstrap, games as clusters" and check.pairs == N
    # No resample is within the margin, yet p is (0 + 1) / (B + 1), not 0: B resamples cannot show p = 0.
    assert check.p_value == pytest.approx(1 / (load_params(params_file).promotion.bootstrap_resamples + 1))
    assert decision.reason.startswith("kept back: frozenlake invalid_action_rate 100.0% vs base's 95.0% (worse by 5.0%")
    assert decision.reason.endswith("base stays champion")
    assert lifecycle.champion(load_params(params_file), tmp_path) == "base"


def test_more_tokens_per_turn_beyond_the_margin_is_kept_back_and_within_it_promoted(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "base", "r3": "base"})
    evaluated(tmp_path, "base", tokens=40)
    evaluated(tmp_path, "r1", tokens=48)  # +20% > the 10% margin
    assert list(blocking(gate(params_file, "r1"))) == ["frozenlake tokens_per_turn"]
    evaluated(tmp_path, "r2", tokens=43)  # +7.5%: worse, but within the margin
    assert gate(params_file, "r2").decision == "champion"
    evaluated(tmp_path, "r3", tokens=32)  # shorter replies are better, and said so
    (tokens,) = [c for c in gate(params_file, "r3").checks if c.metric == "tokens_per_turn"]
    assert describe(tokens, "r2").startswith("frozenlake tokens_per_turn 32.0 vs r2's 43.0 (better by 25.6%, ")


def test_an_ood_drop_beyond_noise_is_kept_back_and_one_within_noise_promoted(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "base", "r3": "base"})
    evaluated(tmp_path, "base", ood_failed=2)
    evaluated(tmp_path, "r1", ood_failed=12)  # 10 prompts lost, none won: exact McNemar p = 2^-10
    decision = gate(params_file, "r1")
    assert list(blocking(decision)) == ["ood ood_instruction_pass"]
    assert blocking(decision)["ood ood_instruction_pass"].discordant == 10
    evaluated(tmp_path, "r2", ood_failed=4)  # 2 prompts lost: within noise (p = 0.25)
    assert gate(params_file, "r2").decision == "champion"
    evaluated(tmp_path, "r3", loglik=-3.6)  # 20% lower log-likelihood of fixed prose: no noise to excuse it
    assert list(blocking(gate(params_file, "r3"))) == ["ood ood_loglik"]


def test_a_pass_rate_drop_is_tested_on_the_discordant_games(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "base"})
    evaluated(tmp_path, "base", won=20)
    evaluated(tmp_path, "r1", won=10)  # lost 10 games, won none of the champion's losses: p < 0.001
    kept = gate(params_file, "r1")
    assert list(blocking(kept)) == ["frozenlake pass_rate"]
    assert blocking(kept)["frozenlake pass_rate"].test == "exact McNemar"
    evaluated(tmp_path, "r2", won=18)  # 2 games fewer: within noise
    assert gate(params_file, "r2").decision == "champion"


def test_a_margin_forgives_a_significant_but_small_drop(tmp_path):
    params_file = project(tmp_path, {"r1": "base"}, promotion={"margins": {"pass_rate": 0.15}})
    evaluated(tmp_path, "base", won=20)
    evaluated(tmp_path, "r1", won=10)  # -10 points, significant, but inside the 15-point margin
    assert gate(params_file, "r1").decision == "champion"


def test_the_champion_chain_and_planning_from_it(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1", "r3": "r1"})
    evaluated(tmp_path, "base", won=10)
    evaluated(tmp_path, "r1", won=30)
    assert gate(params_file, "r1").decision == "champion"
    evaluated(tmp_path, "r2", won=30, invalid=2)
    assert gate(params_file, "r2").decision == "challenger"
    evaluated(tmp_path, "r3", won=31)
    assert gate(params_file, "r3").champion_before == "r1"
    params = load_params(params_file)
    assert lifecycle.aliases(params, tmp_path) == {"r3": "champion", "r2": "challenger"}
    assert rounds.plan(params_file).start_from == "r3"


def test_policy_always_promotes_every_trained_round(tmp_path):
    params_file = project(tmp_path, {"r1": "base"}, promotion={"policy": "always"})
    evaluated(tmp_path, "base", won=60)
    evaluated(tmp_path, "r1", won=0, invalid=2)
    decision = gate(params_file, "r1")
    assert decision.decision == "champion" and decision.blocked_by  # promoted, but the checks are on record


def test_a_round_that_did_not_train_is_untrained_and_changes_nothing(tmp_path):
    params_file = project(tmp_path, {"r1": "base"})
    evaluated(tmp_path, "base")
    evaluated(tmp_path, "r1")
    summary = ProjectPaths(tmp_path).round("r1").model / "train_summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"trained": False, "skipped_reason": "no headroom: ..."}))
    decision = gate(params_file, "r1")
    assert (decision.decision, decision.trained, decision.champion_after) == ("untrained", False, "base")
    assert decision.reason == "not trained: no headroom: ...; base stays champion"
    assert lifecycle.aliases(load_params(params_file), tmp_path) == {}


def test_a_chat_log_round_has_nothing_to_compare_and_is_promoted_saying_so(tmp_path):
    params_file = project(tmp_path, {"r1": "base"})
    evaluated(tmp_path, "base", won=3)
    path = ProjectPaths(tmp_path).round("r1").details
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"log_round": True, "gap": {"overall": 0.1}}))
    record = gate(params_file, "r1")
    assert record.decision == "champion" and "nothing to fall below" in record.reason
    assert record.pass_rate is None


def test_promoting_a_round_on_conversations_without_a_canary_says_its_users_could_judge_it(tmp_path):
    raw = {"seed": 1, "rounds": {"r1": {"from": "base", "collect": {"source": "chatlog", "chatlog": "log.jsonl"}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    evaluated(tmp_path, "base", won=3)
    path = ProjectPaths(tmp_path).round("r1").details
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"log_round": True, "gap": {"overall": 0.1}}))
    done = oel("promote", "--round", "r1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "note: r1 learned from conversations" in done.stdout and "`oel canary`" in done.stdout
    raw["serve"] = {"canary": 0.1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert "note:" not in oel("promote", "--round", "r1", cwd=tmp_path).stdout


def test_force_and_rollback_are_recorded_and_move_the_champion(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1"})
    evaluated(tmp_path, "base", won=10)
    evaluated(tmp_path, "r1", won=30)
    gate(params_file, "r1")
    evaluated(tmp_path, "r2", won=30, invalid=2)
    assert gate(params_file, "r2").decision == "challenger"
    params = load_params(params_file)
    with pytest.raises(lifecycle.PromotionError, match="say why with --reason"):
        lifecycle.force(params, tmp_path, "r2", "  ")
    forced = lifecycle.force(params, tmp_path, "r2", "invalid moves do not matter for this deployment")
    assert (forced.decision, forced.champion_after, forced.blocked_by) == ("champion", "r2",
                                                                          ["frozenlake invalid_action_rate"])
    assert forced.events[-1].kind == "force" and forced.reason.startswith("forced by a person: invalid moves")
    assert lifecycle.champion(params, tmp_path) == "r2"
    back = lifecycle.rollback(params, tmp_path, "users complained")
    assert (back.round, back.decision, back.champion_after) == ("r2", "rolled_back", "r1")
    assert [e.kind for e in back.events] == ["force", "rollback"]
    assert lifecycle.champion(params, tmp_path) == "r1" and lifecycle.aliases(params, tmp_path) == {"r1": "champion"}
    lifecycle.rollback(params, tmp_path, "r1 too")
    assert lifecycle.champion(params, tmp_path) == "base"
    with pytest.raises(lifecycle.PromotionError, match="champion is base"):
        lifecycle.rollback(params, tmp_path, "again")
    # A re-gate keeps the people's overrides on record.
    assert [e.kind for e in gate(params_file, "r2").events] == ["force", "rollback"]


def test_plan_refuses_an_ungated_or_stale_last_round(tmp_path):
    import os

    params_file = project(tmp_path, {"r1": "base"})
    evaluated(tmp_path, "base")
    evaluated(tmp_path, "r1")
    before = params_file.read_text()
    with pytest.raises(lifecycle.PromotionError, match=r"round r1 has no promotion decision.*oel promote --round r1"):
        rounds.plan(params_file)
    assert params_file.read_text() == before
    gate(params_file, "r1")
    assert lifecycle.undecided(load_params(params_file), tmp_path) == []
    details = ProjectPaths(tmp_path).round("r1").details  # eval reran (dvc repro) after the gate decided
    later = ProjectPaths(tmp_path).round("r1").promotion.stat().st_mtime_ns + 10**9
    os.utime(details, ns=(later, later))
    assert lifecycle.undecided(load_params(params_file), tmp_path) == ["r1"]
    with pytest.raises(lifecycle.PromotionError, match="older than eval.json"):
        rounds.plan(params_file)


def oel(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "oel"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("case", "args", "message"), [
    ("unknown alias", ["iterate", "--from", "best"],
     "error: --from 'best' is neither an alias nor a declared round; use champion, challenger, base or one of r1"),
    ("alias in params.yaml", ["rounds"],
     "error: params.yaml: (top level): rounds.r2.from: 'champion' is a registry alias, not a round"),
    ("old margin key", ["promote", "--round", "r1"],
     "error: params.yaml: promotion: margin is now one per metric: delete promotion.margin"),
    ("margin out of range", ["promote", "--round", "r1"], "error: params.yaml: promotion.margins.pass_rate: "),
    ("force without a reason", ["promote", "--round", "r1", "--force"], "error: say why with --reason TEXT"),
    ("rollback of base", ["rollback", "--reason", "x"], "error: the champion is base"),
    ("damaged decision", ["rounds"], "error: "),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, case, args, message):
    chain = {"r1": "base", "r2": "champion"} if case == "alias in params.yaml" else {"r1": "base"}
    sections = {"old margin key": {"promotion": {"margin": 0.1}},
                "margin out of range": {"promotion": {"margins": {"pass_rate": 1.5}}}}.get(case, {})
    project(tmp_path, chain, **sections)
    evaluated(tmp_path, "base", won=1)
    evaluated(tmp_path, "r1", won=1)
    if case == "force without a reason":
        gate(tmp_path / "params.yaml", "r1")
    if case == "damaged decision":
        ProjectPaths(tmp_path).round("r1").promotion.write_text('{"round": "r1", "decision": "maybe"}')
    before = snapshot(tmp_path)
    done = oel(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    if case == "damaged decision":
        assert "promotion.json" in done.stderr
    assert snapshot(tmp_path) == before


def test_oel_rounds_lists_every_metric_check(tmp_path):
    params_file = project(tmp_path, {"r1": "base", "r2": "r1", "r3": "r1"})
    evaluated(tmp_path, "base", won=10)
    for r, won, invalid in (("r1", 30, 0), ("r2", 30, 2)):
        evaluated(tmp_path, r, won=won, invalid=invalid)
        gate(params_file, r)
    done = oel("rounds", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:5] == ["round", "from", "alias", "gate", "pass"]
    assert [line.split()[:4] for line in lines[1:4]] == [["r1", "base", "champion", "champion"],
                                                         ["r2", "r1", "challenger", "challenger"],
                                                         ["r3", "r1", "—", "not"]]
    assert "kept back: frozenlake invalid_action_rate 100.0% vs r1's 0.0%" in lines[2]
    checks = [line.strip() for line in lines if line.startswith("  ")]
    assert len(checks) == 10  # r1 and r2: pass, invalid, tokens, OOD instruction pass, OOD log-likelihood
    assert sum(line.startswith("BLOCKS") for line in checks) == 1
    assert lines[-1] == "next round: r3, from r1 (declared)"


def test_the_report_says_why(tmp_path):
    from oel.rounds.report import promotion_section

    params_file = project(tmp_path, {"r1": "base", "r2": "r1"})
    evaluated(tmp_path, "base", won=10)
    for r, won, invalid in (("r1", 30, 0), ("r2", 30, 2)):
        evaluated(tmp_path, r, won=won, invalid=invalid)
        gate(params_file, r)
    text = promotion_section(load_params(params_file), tmp_path, ["base", "r1", "r2"])
    assert "| r1 | base | yes | champion | champion | promoted: no headline metric worse than base's" in text
    assert "| r2 | r1 | yes | challenger | challenger | kept back: frozenlake invalid_action_rate 100.0%" in text
    assert "| r2 | r1 | frozenlake | invalid_action_rate | **blocks** |" in text
    assert text.endswith("Next round: r3, from r1.")

"""`oel report` from hand-made metrics, stores and episodes in a temp project."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oel.artifacts import write_json, write_jsonl
from oel.errors import UserError
from oel.metrics import by_game, by_store
from oel.paths import ProjectPaths
from oel.rounds.report import fence, pick_samples, write_report
from tests.unit.test_metrics import episode

PNG = b"\x89PNG\r\n\x1a\n"
HOSTILE = "```\n</pre><script>alert(1)</script>"


def make_project(root: Path) -> Path:
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump({"model": {"name": "tiny-random"},
                                           "games": {"textworld": {"enabled": False}},
                                           "eval": {"episodes_per_game": 2},
                                           "rounds": {"r1": {"from": "base"}, "r2": {"from": "r1"}}}))
    p = ProjectPaths(root)
    base_eps = [episode("frozenlake", False, [10, 12]), episode("frozenlake", False, [9], seed=1),
                episode("sokoban", False, [20]), episode("sokoban", False, [20, 20], seed=1)]
    write_json(p.round("base").details, {"heldout": by_game(base_eps),
                                         "ood": {"instruction_pass": 0.5, "loglik_nats_per_token": -3.25, "flag": False},
                                         "ood_flag": False})
    student = [episode("frozenlake", True, [6]), episode("frozenlake", False, [5], seed=1),
               episode("sokoban", False, [8]), episode("sokoban", False, [8], seed=1)]
    teacher = [episode("frozenlake", True, [7], store=0), episode("frozenlake", True, [7], store=0, seed=1),
               episode("sokoban", False, [7], store=0), episode("sokoban", False, [7], store=0, seed=1)]
    t = by_store(teacher)
    write_json(p.round("r1").details, {
        "heldout": by_game(student), "teacher": t, "teacher_plain": by_game(base_eps),
        "headroom": {g: t["mean"][g]["pass_rate"] - 0.0 for g in t["mean"]},
        "ood": {"instruction_pass": 0.2, "loglik_nats_per_token": -3.5, "flag": True}, "ood_flag": True})
    student[0].turns[0].response = HOSTILE
    student[0].turns[0].action = "up` <b>x</b>"
    for ep in student:
        ep.round = ep.policy = "r1"
    write_jsonl(p.round("r1").eval_episodes, student + teacher)
    p.round("r1").store("frozenlake", 0).parent.mkdir(parents=True)
    p.round("r1").store("frozenlake", 0).write_text("- EXPERIENCE ITEM: go right first.\n" + HOSTILE, encoding="utf-8")
    return params_file


def test_report_across_finished_rounds(tmp_path: Path):
    out = write_report(make_project(tmp_path), tmp_path)
    md = out.read_text(encoding="utf-8")
    assert out == tmp_path / "reports" / "summary.md"
    # r2 is declared but not finished: no row; base and r1 are.
    assert "| base | — | 0.0% (0.0%–" in md
    assert "| r1 | base | 25.0% (" in md and "| 50.0% | 50.0% |" in md  # teacher 50%, headroom 50%
    assert "| r2 |" not in md
    assert "| r1 | frozenlake | 0.0% | 100.0% | 50.0% | 100.0% |" in md  # base / teacher / student / headroom
    # Sizes and intervals beside every turn-level rate: games, turns, tokens/turn and invalid actions (95% CI).
    assert "| base | frozenlake | 0.0% | — | 0.0% | — | 2 | 3 | 10.3 (8.6–12.1) | 0.0% (0.0%–56.1%) |" in md
    assert "`base` pooled over 2 games: 0/4 held-out games solved" in md and "solved none" in md
    assert "`r1` frozenlake: 1/2 held-out games solved" in md and "`r1` sokoban: 0/2" in md
    # Per game first; every number pooled across games says so.
    assert md.index("## Per game") < md.index("## Rounds (pooled over games)")
    assert md.index("`r1` frozenlake:") < md.index("`r1` pooled over 2 games:")
    assert "student pass, pooled (95% CI)" in md and "### r1 — frozenlake store 0" in md
    assert "| 20.0% | -3.500 |" in md  # OOD as measured; its comparison is the gate's (section Promotion)
    assert "| r1 | base | — | — | — | not gated yet |" in md
    assert "go right first." in md
    assert "![pass rate and response tokens by round](plots/rounds.png)" in md
    assert (tmp_path / "reports" / "plots" / "rounds.png").read_bytes().startswith(PNG)
    html = (tmp_path / "reports" / "summary.html").read_text(encoding="utf-8")
    assert "<table>" in html and "<script>" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;" in html


def test_fence_cannot_be_closed_by_its_content():
    text = "a ``` b ```` c"
    fenced = fence(text)
    assert fenced.startswith("`````text\n") and fenced.endswith("\n`````")


def test_samples_are_the_students_own_success_first():
    eps = [episode("frozenlake", False, [1], seed=0), episode("frozenlake", True, [1], seed=1),
           episode("frozenlake", True, [1], store=0, seed=2)]
    picked = pick_samples(eps, "r1")
    assert [ep.seed for ep in picked] == [1, 0]


def test_no_finished_round_is_one_clear_error(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("model: {name: tiny-random}\n")
    with pytest.raises(UserError, match="no finished round"):
        write_report(tmp_path / "params.yaml", tmp_path)



def test_report_states_the_held_out_sizes_and_what_they_can_detect():
    from oel.rounds.report import power_sentence
    from tests.conftest import tiny_params

    line = power_sentence(tiny_params(eval={"episodes_per_game": 100, "teacher_stores": 1}, extract={"stores": 2}))
    assert "With 100 games each" in line and "at least 20 points apart" in line and "12 points near 10%" in line
    assert "plays 1 of 2 stores" in line
    assert "at least 81 points apart" in power_sentence(tiny_params(eval={"episodes_per_game": 6}))

    teacher_on = power_sentence(tiny_params(eval={"with_knowledge": True}))
    assert "plays" in teacher_on and "No teacher level" not in teacher_on
    assert "No teacher level on held-out seeds" in power_sentence(tiny_params(eval={"with_knowledge": False}))


def test_the_headroom_checks_are_in_the_report_with_the_teacher_and_the_plain_policy(tmp_path: Path):
    """Without a held-out teacher level (the cpu profile), the headroom stage's checks are where the report shows
    what the knowledge did in context: each metric's teacher and no-knowledge value, p and the verdict."""
    from oel.schemas import HeadroomVerdict

    params_file = make_project(tmp_path)
    checks = {"frozenlake store 0 tokens_per_turn": {"test": "paired bootstrap, games as clusters", "pairs": 48,
                                                      "candidate": 37.7, "champion": 30.8, "p_value": 0.001,
                                                      "blocked": True},
              "frozenlake store 0 invalid_action_rate": {"test": "paired bootstrap, games as clusters", "pairs": 48,
                                                          "candidate": 0.932, "champion": 0.961, "p_value": 0.8,
                                                          "blocked": False}}
    write_json(ProjectPaths(tmp_path).round("r1").headroom, HeadroomVerdict(
        round="r1", start_policy="base", headroom=True, reason="the teacher is better beyond noise on frozenlake "
        "store 0 tokens_per_turn", episodes_per_game=48, checks=checks,
        better=["frozenlake store 0 tokens_per_turn"]).model_dump(mode="json"))
    md = write_report(params_file, tmp_path).read_text(encoding="utf-8")
    assert "| r1 | 48 | yes | the teacher is better beyond noise on frozenlake store 0 tokens_per_turn |" in md
    assert ("| r1 | frozenlake store 0 tokens_per_turn | 30.8 | 37.7 | 0.001 | paired bootstrap, games as "
            "clusters, 48 | **yes** |") in md
    assert "| r1 | frozenlake store 0 invalid_action_rate | 96.1% | 93.2% | 0.8 |" in md and "48 | no |" in md
    assert "No teacher level on held-out seeds (`eval.with_knowledge: false`)" in md   # the cpu profile's default
    assert "The teacher level is off (`eval.with_knowledge: false`)" in md



def test_an_untrained_rounds_numbers_are_said_to_be_its_start_policys(tmp_path: Path):
    from oel.artifacts import read_json

    params_file = make_project(tmp_path)
    r1 = ProjectPaths(tmp_path).round("r1").details
    write_json(r1, {**read_json(r1), "untrained": {"from": "base", "reason": "no headline metric better"}})
    md = write_report(params_file, tmp_path).read_text(encoding="utf-8")
    assert ("`r1` frozenlake: 1/2 held-out games solved (50.0%, 95% CI 9.5%–90.5%) — not trained (`no headline "
            "metric better`): its policy is `base`'s weights, so these are `base`'s numbers, not played again") in md


@pytest.mark.parametrize("breakdown", [{"heldout": [1, 2]}, {"heldout": {"overall": 5}}, {"gap": [1]},
                                       {"heldout": {"overall": {"pass_rate": "high"}}}])
def test_a_wrong_shaped_eval_is_one_line_naming_the_file(tmp_path: Path, breakdown):
    (tmp_path / "params.yaml").write_text("model: {name: tiny-random}\n")
    write_json(ProjectPaths(tmp_path).round("base").details, breakdown)
    with pytest.raises(UserError, match=r"reports/base/eval.json: ") as err:
        write_report(tmp_path / "params.yaml", tmp_path)
    assert len(str(err.value).splitlines()) == 1

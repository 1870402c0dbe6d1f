"""eval: held-out play, the teacher's headroom, the OOD probe, plots -> reports/<round>/.

Three levels per game, all on the fixed held-out seeds (identical every round, disjoint from training seeds):
  student  the round's policy (models/<r>; `base` = round 0) with NO knowledge in context -- the headline.
  teacher  the round's START policy (params rounds.<r>.from) with each store data/<r>/knowledge/stores/
           store-<k>.md in context: exactly what the distillation teacher saw (the paper's frozen
           round-start model + knowledge), so `headroom` = teacher - start policy without knowledge.
  base     reports/base/metrics.json, read for the plots.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from oel import tracking
from oel.artifacts import read_json, write_json, write_jsonl
from oel.config import Params
from oel.metrics import OVERALL, by_game, by_store, headroom
from oel.paths import ProjectPaths, RoundPaths
from oel.plots import curve_row, curve_rows, levels_of, plot_levels, plot_rounds, write_curve
from oel.schemas import Episode
from oel.stages._common import load_round_policy

log = logging.getLogger(__name__)
STORE_FILE = re.compile(r"^store-(\d+)\.md$")


def run(params: Params, paths: RoundPaths, with_knowledge: bool | None = None) -> dict[str, Any]:
    """Evaluate the round's policy; write metrics.json, eval episodes, curve.json and plots."""
    with_knowledge = params.eval.with_knowledge if with_knowledge is None else with_knowledge
    student = load_student(params, paths)
    episodes = play_heldout(student, params, paths, policy=paths.round_id)
    metrics: dict[str, Any] = {"heldout": by_game(episodes)}
    if with_knowledge:
        episodes += teacher_level(params, paths, metrics)
    if params.eval.ood:
        metrics["ood"] = ood_block(student, params, paths)
        metrics["ood_flag"] = metrics["ood"]["flag"]
    write_jsonl(paths.eval_episodes, episodes)
    plots = draw_plots(params, paths, metrics)
    write_json(paths.metrics, metrics)  # last: its presence marks the round evaluated (oel.rounds.is_done)
    publish(params, paths, metrics, plots)
    _say_honestly(metrics)
    return metrics


def headroom_check(params: Params, paths: RoundPaths) -> dict[str, Any]:
    """Issue 5's check, runnable before any training (needs only the round's stores): does knowledge in
    context beat the round-start policy without it? If not, distillation has nothing to transfer.
    Writes reports/<r>/headroom.json and data/<r>/eval/headroom_episodes.jsonl."""
    if not store_files(paths):
        from oel.errors import UserError

        raise UserError(f"{paths.stores}: no store-<k>.md; run `oel consolidate --round {paths.round_id}` first")
    metrics: dict[str, Any] = {}
    episodes = teacher_level(params, paths, metrics)
    write_jsonl(paths.eval_dir / "headroom_episodes.jsonl", episodes)
    write_json(paths.report_dir / "headroom.json", metrics)
    tracking.log_to_iteration(params, paths.round_id, {
        "headroom_check": metrics["headroom"][OVERALL],
        "headroom_check_teacher_pass_rate": metrics["teacher"]["mean"][OVERALL]["pass_rate"]})
    return metrics


def load_student(params: Params, paths: RoundPaths):
    """models/<r> for a round; the base policy (models/base or params.model) for `base`."""
    if paths.round_id == "base":
        return load_round_policy(params, paths)
    from oel.models import load_policy

    if not (paths.model / "policy.json").is_file():
        from oel.errors import UserError

        raise UserError(f"{paths.model}: round {paths.round_id} has no policy yet; run "
                        f"`oel distill --round {paths.round_id}` first")
    return load_policy(paths.model, params.model, paths.root)


def play_heldout(loaded, params: Params, paths: RoundPaths, policy: str, knowledge: str | None = None,
                 store: int | None = None) -> list[Episode]:
    """Every enabled game on its fixed held-out seeds in one batched play() call.

    The generation seed is params.seed every round, so rounds differ by their policy, not by sampling luck.
    """
    from oel.games import make_game
    from oel.rollout import EpisodeSpec, TransformersBackend, play
    from oel.seeds import episode_seeds

    specs = [EpisodeSpec(game, seed, "heldout", _episode_id(paths.round_id, policy, game, seed, store))
             for game in params.games.enabled()
             for seed in episode_seeds(params.seed, game, "heldout", None, params.eval.episodes_per_game)]
    return play(specs, lambda game: make_game(game, params.games, paths.root),
                TransformersBackend(loaded, params.model.thinking), params.eval.sampling,
                round_id=paths.round_id, policy=policy, knowledge=knowledge, knowledge_store=store,
                batch_size=params.eval.batch_size, seed=params.seed)


def _episode_id(round_id: str, policy: str, game: str, seed: int, store: int | None) -> str:
    # The start policy's plain games share (game, seed) with the student's: the policy keeps ids unique.
    who = "" if policy == round_id else f"-{policy}"
    return f"{round_id}-heldout-{game}-{seed}{who}" + ("" if store is None else f"-k{store}")


def store_files(paths: RoundPaths) -> list[tuple[int, Path]]:
    """The round's stores (data/<r>/knowledge/stores/store-<k>.md) by k."""
    if not paths.stores.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in paths.stores.iterdir() if (m := STORE_FILE.match(p.name))]
    return sorted(found)


def teacher_level(params: Params, paths: RoundPaths, metrics: dict[str, Any]) -> list[Episode]:
    """Start policy + each store; adds `teacher` and `headroom` to metrics. Returns the episodes."""
    stores = store_files(paths)
    if paths.round_id == "base" or not stores:
        log.info("eval@%s: no knowledge stores under %s; skipping the teacher level", paths.round_id, paths.stores)
        return []
    start = params.policy_of(paths.round_id)
    teacher = load_round_policy(params, paths)
    episodes: list[Episode] = []
    for k, path in stores:
        episodes += play_heldout(teacher, params, paths, policy=start, knowledge=path.read_text("utf-8"), store=k)
    metrics["teacher"] = by_store(episodes)
    plain, plain_episodes = start_policy_plain(params, paths, teacher, start)
    metrics["teacher_plain"] = plain
    metrics["headroom"] = headroom(metrics["teacher"]["mean"], plain)
    log.info("eval@%s: teacher (%s + knowledge) pass rate %.3f vs %.3f without: headroom %+.3f", paths.round_id,
             start, metrics["teacher"]["mean"][OVERALL]["pass_rate"], plain[OVERALL]["pass_rate"],
             metrics["headroom"].get(OVERALL, 0.0))
    return episodes + plain_episodes


def start_policy_plain(params: Params, paths: RoundPaths, teacher, start: str):
    """The start policy without knowledge: reports/<start>/metrics.json when it covers the same seed
    count (seeds are fixed across rounds, so that is the same measurement), else played now."""
    earlier = ProjectPaths(paths.root).round(start).metrics
    if earlier.is_file():
        held = read_json(earlier).get("heldout", {})
        if held.get(OVERALL, {}).get("episodes") == params.eval.episodes_per_game * len(params.games.enabled()):
            return held, []
    episodes = play_heldout(teacher, params, paths, policy=start)
    return by_game(episodes), episodes


def ood_block(student, params: Params, paths: RoundPaths) -> dict[str, Any]:
    """The OOD probe of the student, compared with the base round's probe (a drop sets `flag`)."""
    from oel.ood import compare_to_base, run_probe

    scores = run_probe(student, params.eval.ood_max_new_tokens, params.model.thinking, params.eval.batch_size)
    base_file = ProjectPaths(paths.root).round("base").metrics
    base = read_json(base_file).get("ood") if paths.round_id != "base" and base_file.is_file() else None
    samples = scores.pop("samples")
    failed = scores.pop("failed")
    log.info("eval@%s OOD: instruction pass %.3f, loglik %.3f nats/token; sample answer %r; failed %d prompts",
             paths.round_id, scores["instruction_pass"], scores["loglik_nats_per_token"],
             samples[0]["answer"][:120] if samples else "", len(failed))
    return {**scores, **compare_to_base(scores, base, params.eval.ood_drop_threshold)}


def draw_plots(params: Params, paths: RoundPaths, metrics: dict[str, Any]) -> list[Path]:
    """PNGs (the cross-round curve, base/teacher/student bars) and curve.json, the rows behind the curve,
    all in reports/<r>/plots/ (dvc.yaml's plots out, so `dvc plots show` finds the JSON too)."""
    rows = [row for row in curve_rows(params, paths.root, upto=paths.round_id) if row["round"] != paths.round_id]
    rows.append(curve_row(len(rows), paths.round_id, metrics))
    write_curve(rows, paths.plots / "curve.json")
    base_file = ProjectPaths(paths.root).round("base").metrics
    base = read_json(base_file) if base_file.is_file() and paths.round_id != "base" else None
    return [plot_rounds(rows, paths.plots / "rounds.png"),
            plot_levels(levels_of(metrics, base), paths.plots / "levels.png", paths.round_id)]


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers compared across iterations in the MLflow UI."""
    overall = metrics["heldout"][OVERALL]
    out = {"eval_pass_rate": overall["pass_rate"], "eval_response_tokens_per_turn": overall["response_tokens_per_turn"],
           "eval_tokens_per_game": overall["tokens_per_game"]}
    if "teacher" in metrics:
        out["eval_teacher_pass_rate"] = metrics["teacher"]["mean"][OVERALL]["pass_rate"]
        out["eval_headroom"] = metrics["headroom"][OVERALL]
    if "ood" in metrics:
        out["eval_ood_instruction_pass"] = metrics["ood"]["instruction_pass"]
        out["eval_ood_loglik"] = metrics["ood"]["loglik_nats_per_token"]
        out["eval_ood_flag"] = float(metrics["ood"]["flag"])
    return out


def publish(params: Params, paths: RoundPaths, metrics: dict[str, Any], plots: list[Path]) -> None:
    """Plots + metrics file to the stage run (stage_main logs the numbers); headline numbers to the round's
    iteration run (tracking.log_round_artifacts puts the plots folder there at the end of the round)."""
    for path in [*plots, paths.metrics, paths.plots / "curve.json"]:
        tracking.log_artifact(path, "eval")
    tracking.log_to_iteration(params, paths.round_id, headline(metrics))


def _say_honestly(metrics: dict[str, Any]) -> None:
    # A small model solving nothing is a finding, not an error: say it plainly in the log.
    overall = metrics["heldout"][OVERALL]
    if overall["passed"] == 0:
        log.warning("the policy solved none of %d held-out games (95%% CI upper bound %.3f)",
                    overall["episodes"], overall["pass_ci_high"])
    if metrics.get("headroom", {}).get(OVERALL, 1.0) <= 0.0:
        log.warning("knowledge in context did not beat the no-knowledge policy (headroom %.3f): "
                    "distillation has nothing to transfer this round", metrics["headroom"][OVERALL])

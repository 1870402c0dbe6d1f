"""eval: held-out play, the teacher's headroom, the OOD probe, plots -> reports/<round>/, metrics/<round>/.

Three levels per game, all on the fixed held-out seeds (identical every round, disjoint from training seeds):
  student  the round's policy (models/<r>; `base` = round 0) with NO knowledge in context -- the headline.
  teacher  the round's START policy (params rounds.<r>.from) with each store of the game in context:
           a game's held-out seeds are played once per store of THAT game (data/<r>/knowledge/stores/
           <game>/store-<k>.md), never with another game's knowledge -- exactly what the distillation
           teacher saw (the paper's frozen round-start model + knowledge), so `headroom` = teacher -
           start policy without knowledge. Every game and store plays in one batched call.
  start    the start policy without knowledge: reports/<start>/eval.json (a declared dep: the same seeds
           every round make it the same measurement), played now only when its seed count differs.

A round distill did not train (no headroom) holds its start policy's weights: its student level and OOD probe
are that same start eval, taken over with an `untrained` note instead of played again.

A stage knows its own round: everything compared across rounds (the gate against the champion, the OOD drop,
teacher drift, the report's tables) is the round lifecycle's (oel.rounds), which reads these files. The only
earlier rounds eval reads are its start policy's, declared in dvc.yaml: reports/<start>/eval.json and the
lineage curve in reports/<start>/plots/curve.json, which this round's curve extends by one row.

Outputs: reports/<r>/eval.json holds the whole breakdown below (written last: it marks the round
evaluated); metrics/<r>/<game>.json and metrics/<r>/ood.json hold the few headline numbers DVC shows
(`dvc metrics show`, oel.metrics.dvc_metrics); reports/<r>/plots/ the PNGs and curve.json.

The breakdown is per game first; the `overall` block of every level pools the games (reports call it
"pooled"). In metrics["teacher"], `store_<k>.<game>` is that game's store k and `mean.<game>` pools
that game's stores; `store_<k>.overall` pools the k-th stores of different games.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from oel import tracking
from oel.artifacts import read_json, write_json, write_jsonl
from oel.config import Params
from oel.errors import UserError
from oel.metrics import OVERALL, POOLED, by_game, by_store, dvc_metrics, headroom
from oel.paths import ProjectPaths, RoundPaths
from oel.plots import curve_row, levels_of, plot_levels, plot_rounds, write_curve
from oel.rollout import Backend, build_backend, release
from oel.schemas import Episode, TrainSummary
from oel.stages._common import round_policy_spec

log = logging.getLogger(__name__)
Knowledge = dict[str, list[tuple[int, str]]]  # game -> (k, store text) of each of its stores
# The student level: eval.json's blocks so far, the episodes played for it, the OOD block (None: not yet run).
StudentLevel = tuple[dict[str, Any], list[Episode], dict[str, Any] | None]


def run(params: Params, paths: RoundPaths) -> dict[str, Any]:
    """Evaluate the round's policy; write eval episodes, plots, the DVC metrics and, last, eval.json."""
    from oel.ood import ifeval

    ifeval.check_requirements(params)  # eval.ood: ifeval: one line per missing need, before any model loads
    if log_round(paths):  # imported chat logs: no game to play; the eval is the consolidation gap
        return log_round_eval(params, paths)
    start = time.time_ns()
    metrics, episodes, ood = untrained_eval(params, paths) or student_level(params, paths)
    if params.eval.with_knowledge:
        episodes += teacher_level(params, paths, metrics)
    window = (start, time.time_ns())
    if ifeval.enabled(params) and ood is None:  # lm-eval builds its own engine: last, once ours are released
        ood = ood_block(None, params, paths)
    if ood is not None:
        metrics["ood"] = ood
    write_jsonl(paths.eval_episodes, episodes)
    plots = draw_plots(params, paths, metrics)
    write_metrics(paths, metrics)
    write_json(paths.details, metrics)  # last: its presence marks the round evaluated (oel.rounds.is_done)
    publish(params, paths, metrics, plots)
    tracking.log_episode_traces(params, "eval", episodes, window)  # after the writes: it reads the records
    _say_honestly(metrics)
    return metrics


def student_level(params: Params, paths: RoundPaths) -> StudentLevel:
    """The round's policy on the held-out seeds, and the OOD probe on its engine before the engine is released
    (a vLLM teacher needs the GPU next). The probe is None when eval.ood is off or IFEval (run last)."""
    student = load_student(params, paths)
    episodes = play_heldout(student, params, paths, policy=paths.round_id)
    ood = ood_block(student, params, paths) if params.eval.ood is True else None
    release(student)
    return {"heldout": by_game(episodes)}, episodes, ood


def untrained_eval(params: Params, paths: RoundPaths) -> StudentLevel | None:
    """A round distill did not train (no headroom) holds its start policy's weights, and eval plays the same
    seeds with the same generation seed every round: its held-out games and OOD probe ARE its start policy's
    eval (reports/<start>/eval.json, a declared dep), taken from there instead of replayed. A replay measured
    nothing new, only sampling and dtype noise (trained weights load in float32 on a CPU, the base in its
    measured dtype), at the cost of a whole student eval. No episodes of its own: the gate does not compare an
    untrained round. None when the round trained or the start's eval is not the same measurement."""
    from oel.ood import ifeval

    summary_file = paths.model / "train_summary.json"
    if paths.round_id == "base" or not summary_file.is_file():
        return None
    summary = read_json(summary_file, TrainSummary)
    earlier = start_eval(params, paths)
    if summary.trained or earlier is None:
        return None
    ood = earlier.get("ood") if params.eval.ood is not False else None
    if params.eval.ood is not False and not (isinstance(ood, dict) and ("ifeval" in ood) == ifeval.enabled(params)):
        return None  # the start policy did not run the probe this round asks for: measure it
    start = params.policy_of(paths.round_id)
    log.info("eval@%s: not trained (%s); its policy is %s's weights, so its held-out games and OOD probe are %s's "
             "eval, not played again", paths.round_id, summary.skipped_reason, start, start)
    metrics = {"heldout": earlier["heldout"], "untrained": {"from": start, "reason": summary.skipped_reason or ""}}
    return metrics, [], ood


def load_student(params: Params, paths: RoundPaths) -> Backend:
    """A backend (generation.backend) serving models/<r> for a round; the base policy (models/base or
    params.model) for `base`."""
    return build_backend(params, student_spec(params, paths), paths.root)


def student_spec(params: Params, paths: RoundPaths) -> str | Path:
    """The round's policy as a spec (no weights loaded): models/<r>, or the base policy for `base`."""
    if paths.round_id == "base":
        return round_policy_spec(params, paths)
    if not (paths.model / "policy.json").is_file():
        raise UserError(f"{paths.model}: round {paths.round_id} has no policy yet; run "
                        f"`oel distill --round {paths.round_id}` first")
    return paths.model


def load_teacher(params: Params, paths: RoundPaths) -> Backend:
    """A backend serving the round's start policy (the teacher level plays it with knowledge in context)."""
    return build_backend(params, round_policy_spec(params, paths), paths.root)


def play_heldout(backend: Backend, params: Params, paths: RoundPaths, policy: str,
                 knowledge: Knowledge | None = None) -> list[Episode]:
    """Every enabled game on its fixed held-out seeds in one batched play() call.

    knowledge: each game's seeds once per store OF THAT GAME, that store in context (the teacher level).
    The generation seed is params.seed every round, so rounds differ by their policy, not by sampling luck.
    """
    from oel.games import make_game
    from oel.rollout import play

    return play(heldout_specs(params, paths.round_id, policy, knowledge),
                lambda game: make_game(game, params.games, paths.root), backend, params.eval.sampling,
                round_id=paths.round_id, policy=policy, batch_size=params.eval.batch_size, seed=params.seed)


def heldout_specs(params: Params, round_id: str, policy: str, knowledge: Knowledge | None):
    """Per game and seed: one spec without knowledge, or one per store of that game."""
    from oel.rollout import EpisodeSpec
    from oel.seeds import episode_seeds

    specs = []
    for game in params.games.enabled():
        variants = [(None, None)] if knowledge is None else knowledge[game]
        for seed in episode_seeds(params.seed, game, "heldout", None, params.eval.episodes_per_game):
            specs += [EpisodeSpec(game, seed, "heldout", _episode_id(round_id, policy, game, seed, k),
                                  knowledge=text, knowledge_store=k) for k, text in variants]
    return specs


def _episode_id(round_id: str, policy: str, game: str, seed: int, store: int | None) -> str:
    # The start policy's plain games share (game, seed) with the student's: the policy keeps ids unique.
    who = "" if policy == round_id else f"-{policy}"
    return f"{round_id}-heldout-{game}-{seed}{who}" + ("" if store is None else f"-k{store}")


def store_files(paths: RoundPaths) -> dict[str, list[tuple[int, Path]]]:
    return paths.store_files()


def has_stores(paths: RoundPaths) -> bool:
    return bool(paths.store_files()) or paths.has_pooled_stores()


def teacher_knowledge(params: Params, paths: RoundPaths) -> Knowledge:
    """Every enabled game's own stores; a game without stores (or the old pooled layout) is an error."""
    fix = f"knowledge is per game; rerun `oel consolidate --round {paths.round_id}`"
    if paths.has_pooled_stores():
        raise UserError(f"{paths.stores}: store files of the old pooled layout (one set for all games); {fix}")
    files = store_files(paths)
    for game in params.games.enabled():
        if game not in files:
            raise UserError(f"{paths.game_stores(game)}: no store-<k>.md for game {game!r}; {fix}")
    keep = params.eval.teacher_stores or None  # the first N stores of each game (0: all of them)
    return {game: [(k, path.read_text("utf-8")) for k, path in files[game][:keep]]
            for game in params.games.enabled()}


def teacher_level(params: Params, paths: RoundPaths, metrics: dict[str, Any]) -> list[Episode]:
    """Start policy + each store of each game; adds `teacher` and `headroom` to metrics. Returns the episodes."""
    if paths.round_id == "base" or not has_stores(paths):
        log.info("eval@%s: no knowledge stores under %s; skipping the teacher level", paths.round_id, paths.stores)
        return []
    knowledge = teacher_knowledge(params, paths)
    start = params.policy_of(paths.round_id)
    teacher = load_teacher(params, paths)
    episodes = play_heldout(teacher, params, paths, policy=start, knowledge=knowledge)
    metrics["teacher"] = by_store(episodes)
    plain, plain_episodes = start_policy_plain(params, paths, teacher, start)
    release(teacher)
    metrics["teacher_plain"] = plain
    metrics["headroom"] = headroom(metrics["teacher"]["mean"], plain)
    log.info("eval@%s: teacher (%s + its game's knowledge) vs without: %s", paths.round_id, start,
             "; ".join(f"{POOLED if game == OVERALL else game} {metrics['teacher']['mean'][game]['pass_rate']:.3f} "
                       f"vs {plain[game]['pass_rate']:.3f} (headroom {gain:+.3f})"
                       for game, gain in metrics["headroom"].items()))
    return episodes + plain_episodes


def start_policy_plain(params: Params, paths: RoundPaths, teacher, start: str):
    """The start policy without knowledge: its own eval (start_eval) when that is the same measurement,
    else played now."""
    earlier = start_eval(params, paths)
    if earlier is not None:
        return earlier["heldout"], []
    episodes = play_heldout(teacher, params, paths, policy=start)
    return by_game(episodes), episodes


def start_eval(params: Params, paths: RoundPaths) -> dict[str, Any] | None:
    """reports/<start>/eval.json when its held-out games cover the same seed count (seeds are fixed across
    rounds, so that is the same measurement); None when it is missing, damaged or differently sized."""
    earlier = ProjectPaths(paths.root).round(params.policy_of(paths.round_id)).details
    if not earlier.is_file():
        return None
    found = read_json(earlier, dict)
    held = found.get("heldout")
    blocks = held.values() if isinstance(held, dict) else ()
    usable = OVERALL in (held or {}) and all(isinstance(b, dict) and isinstance(b.get("pass_rate"), (int, float))
                                             for b in blocks)
    if usable and held[OVERALL].get("episodes") == params.eval.episodes_per_game * len(params.games.enabled()):
        return found
    return None


def ood_block(student: Backend | None, params: Params, paths: RoundPaths) -> dict[str, Any]:
    """The OOD check of the round's policy: the probe on the student's engine, with the ids of its prompts and
    of those failed (the gate pairs them with the champion's), or (eval.ood: ifeval) lm-eval's IFEval task,
    which serves the policy itself. How it compares with another round is the lifecycle's business."""
    from oel.ood import ifeval, run_probe

    if ifeval.enabled(params):
        scores = ifeval.run_ifeval(params, student_spec(params, paths), paths.root)
        log.info("eval@%s OOD (IFEval, %d prompts): prompt-level strict %.3f, instruction-level strict %.3f",
                 paths.round_id, scores["prompts"], scores["instruction_pass"], scores["instruction_level_pass"])
        return scores
    scores = run_probe(student, params.eval.ood_max_new_tokens, params.eval.batch_size)
    samples = scores.pop("samples")
    log.info("eval@%s OOD: instruction pass %.3f, loglik %.3f nats/token; sample answer %r; failed %d prompts",
             paths.round_id, scores["instruction_pass"], scores["loglik_nats_per_token"],
             samples[0]["answer"][:120] if samples else "", len(scores["failed"]))
    return scores


def draw_plots(params: Params, paths: RoundPaths, metrics: dict[str, Any]) -> list[Path]:
    """PNGs (the lineage curve, start/teacher/student bars) and curve.json, all in reports/<r>/plots/ (dvc.yaml's
    plots out, so `dvc plots show` finds the JSON too). The curve is the start policy's curve (a declared dep)
    plus this round: base -> ... -> the start policy -> this round, the chain this policy was trained along."""
    rows = lineage(params, paths)
    rows.append(curve_row(len(rows), paths.round_id, metrics))
    write_curve(rows, paths.plots / "curve.json")
    return [plot_rounds(rows, paths.plots / "rounds.png"),
            plot_levels(levels_of(metrics, metrics.get("teacher_plain")), paths.plots / "levels.png", paths.round_id)]


def lineage(params: Params, paths: RoundPaths) -> list[dict[str, Any]]:
    """The start policy's curve rows (reports/<start>/plots/curve.json), or none for round 0."""
    if paths.round_id == "base":
        return []
    curve = ProjectPaths(paths.root).round(params.policy_of(paths.round_id)).plots / "curve.json"
    if not curve.is_file():
        return []
    rows = read_json(curve)
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{curve}: expected a JSON list of curve rows; rerun `oel eval` of that round")
    return rows


def write_metrics(paths: RoundPaths, metrics: dict[str, Any]) -> list[Path]:
    """metrics/<r>/<game>.json and ood.json (the DVC metrics); a stale file of a game no longer enabled
    goes, so the folder shows this eval only (DVC clears it before `dvc repro`, `oel eval` does not)."""
    files = dvc_metrics(metrics)
    for stale in paths.metrics_dir.glob("*.json") if paths.metrics_dir.is_dir() else []:
        if stale.stem not in files:
            stale.unlink()
    for name, row in files.items():
        write_json(paths.metrics_file(name), row)
    return [paths.metrics_file(name) for name in files]


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers compared across iterations in the MLflow UI."""
    overall = metrics["heldout"][OVERALL]
    out = {"eval_pass_rate": overall["pass_rate"], "eval_response_tokens_per_turn": overall["response_tokens_per_turn"],
           "eval_tokens_per_game": overall["tokens_per_game"], "eval_invalid_action_rate": overall["invalid_action_rate"]}
    if "teacher" in metrics:
        out["eval_teacher_pass_rate"] = metrics["teacher"]["mean"][OVERALL]["pass_rate"]
        out["eval_headroom"] = metrics["headroom"][OVERALL]
    # Per game too (the names above pool the games; reports label them "pooled").
    for game, block in metrics["heldout"].items():
        if game != OVERALL:
            out[f"eval_pass_rate/{game}"] = block["pass_rate"]
            out[f"eval_invalid_action_rate/{game}"] = block["invalid_action_rate"]
    for game, gain in metrics.get("headroom", {}).items():
        if game != OVERALL:
            out[f"eval_headroom/{game}"] = gain
    if "ood" in metrics:
        out |= ood_headline(metrics["ood"])
    return out


def ood_headline(ood: dict[str, Any]) -> dict[str, float]:
    """The OOD numbers on the iteration run: IFEval has no held-out log-likelihood, the probe no loose score."""
    out = {"eval_ood_instruction_pass": ood["instruction_pass"]}
    if "flag" in ood:  # a log round compares its start and end policies itself
        out["eval_ood_flag"] = float(ood["flag"])
    if "loglik_nats_per_token" in ood:
        out["eval_ood_loglik"] = ood["loglik_nats_per_token"]
    if "ifeval" in ood:
        out["eval_ood_instruction_level_pass"] = ood["instruction_level_pass"]
    return out


def publish(params: Params, paths: RoundPaths, metrics: dict[str, Any], plots: list[Path]) -> None:
    """Plots + metrics file to the stage run (stage_main logs the numbers); headline numbers to the round's
    iteration run (tracking.log_round_artifacts puts the plots folder there at the end of the round)."""
    for path in [*plots, paths.details, paths.plots / "curve.json"]:
        tracking.log_artifact(path, "eval")
    tracking.log_to_iteration(params, paths.round_id, headline(metrics))


def _say_honestly(metrics: dict[str, Any]) -> None:
    # A small model solving nothing is a finding, not an error: say it plainly in the log.
    overall = metrics["heldout"][OVERALL]
    if overall["passed"] == 0:
        log.warning("the policy solved none of %d held-out games (95%% CI upper bound %.3f)",
                    overall["episodes"], overall["pass_ci_high"])
    for game, gain in metrics.get("headroom", {}).items():
        if gain <= 0.0:
            log.warning("%s: knowledge in context did not beat the no-knowledge policy (headroom %.3f): "
                        "distillation has nothing to transfer there this round",
                        POOLED if game == OVERALL else game, gain)


# ---- a round on imported chat logs ---------------------------------------------------------------------

def log_round(paths: RoundPaths) -> bool:
    """A round whose trajectories are chat logs only (oel.chatlog): there is no game to play."""
    from oel.artifacts import iter_jsonl
    from oel.chatlog import is_chat

    if paths.round_id == "base" or not paths.trajectories.is_file():
        return False
    return all(is_chat(ep) for ep in iter_jsonl(paths.trajectories, Episode))


def log_round_eval(params: Params, paths: RoundPaths) -> dict[str, Any]:
    """The consolidation gap on the held-out conversations, round start vs after (oel.gap), the reply
    length and the OOD probe of both policies. Writes data/<r>/eval/gap.jsonl, metrics/<r>/chat.json +
    ood.json, reports/<r>/plots/gap.json and, last, reports/<r>/eval.json."""
    from oel import gap
    from oel.artifacts import read_jsonl
    from oel.chatlog import CHAT_GAME
    from oel.ood import compare_to_base, ifeval

    stores = [path.read_text("utf-8") for _, path in paths.store_files().get(CHAT_GAME, [])]
    rows = gap.gap_rows(read_jsonl(paths.trajectories, Episode), stores, params.eval.gap_prompts, params.seed,
                        paths.round_id)
    start_id = params.policy_of(paths.round_id)
    start_paths = ProjectPaths(paths.root).round(start_id)
    start, student = load_student(params, start_paths), load_student(params, paths)
    cfg, thinking = params.eval, params.model.thinking
    log.info("eval@%s: consolidation gap on %d held-out chat prompts (%d stores), %s vs %s", paths.round_id,
             len(rows), len(stores), start_id, paths.round_id)
    at_start = gap.measure(start, start, rows, cfg.sampling, params.seed, cfg.batch_size, thinking)
    after = gap.measure(student, start, rows, cfg.sampling, params.seed, cfg.batch_size, thinking)
    metrics: dict[str, Any] = {"log_round": True, "gap": {
        "start_policy": start_id, "prompts": len(rows), "stores": len(stores),
        "start": _public(at_start), "after": _public(after), **gap.compare(at_start, after)}}
    if ifeval.enabled(params):  # lm-eval serves each policy itself, on a GPU our engines no longer hold
        release(start)
        release(student)
    if cfg.ood:  # both policies probed now: `flag` is a drop versus the round's start, not versus base
        before = ood_block(start, params, start_paths)
        probe = ood_block(student, params, paths)
        metrics["ood_start"] = before
        compare = ifeval.compare_to_base if ifeval.enabled(params) else compare_to_base
        metrics["ood"] = {**probe, **compare(probe, before, cfg.ood_drop_threshold)}
        metrics["ood_flag"] = metrics["ood"]["flag"]
    _write_log_round(paths, rows, at_start, after, metrics)
    tracking.log_to_iteration(params, paths.round_id, log_headline(metrics))
    return metrics


def _public(measured: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in measured.items() if k not in ("per_row", "lengths")}


def _write_log_round(paths: RoundPaths, rows, at_start: dict[str, Any], after: dict[str, Any],
                     metrics: dict[str, Any]) -> None:
    per_row = [{"row_id": row.row_id, "store": row.store, "kl_start": a, "kl_after": b, "tokens_start": la,
                "tokens_after": lb} for row, a, b, la, lb in zip(rows, at_start["per_row"], after["per_row"],
                                                                   at_start["lengths"], after["lengths"], strict=True)]
    write_jsonl(paths.eval_dir / "gap.jsonl", per_row)
    g = metrics["gap"]
    write_json(paths.plots / "gap.json", [{"step": 0, "policy": g["start_policy"], "kl": g["start"]["kl_mean"],
                                           "response_tokens": g["start"]["response_tokens_mean"]},
                                          {"step": 1, "policy": paths.round_id, "kl": g["after"]["kl_mean"],
                                           "response_tokens": g["after"]["response_tokens_mean"]}])
    for stale in paths.metrics_dir.glob("*.json") if paths.metrics_dir.is_dir() else []:
        stale.unlink()
    write_json(paths.metrics_file("chat"), {"gap_start": g["start"]["kl_mean"], "gap_after": g["after"]["kl_mean"],
                                            "gap_reduction": g["reduction_mean"], "prompts": g["prompts"],
                                            "response_tokens": g["after"]["response_tokens_mean"]})
    if "ood" in metrics:
        write_json(paths.metrics_file("ood"), {k: metrics["ood"][k] for k in
                                               ("instruction_pass", "loglik_nats_per_token", "flag")
                                               if k in metrics["ood"]})
    write_json(paths.details, metrics)  # last: its presence marks the round evaluated (oel.rounds.is_done)


def log_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The log round's numbers on its MLflow iteration run (stage_main logs the whole breakdown too)."""
    g = metrics["gap"]
    out = {"eval_gap_start": g["start"]["kl_mean"], "eval_gap_after": g["after"]["kl_mean"],
           "eval_gap_reduction": g["reduction_mean"], "eval_gap_prompts": float(g["prompts"]),
           "eval_response_tokens_start": g["start"]["response_tokens_mean"],
           "eval_response_tokens_per_turn": g["after"]["response_tokens_mean"]}
    if "ood" in metrics:
        out |= ood_headline(metrics["ood"])
    return out

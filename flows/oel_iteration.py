"""`oel-iteration`: advance the OEL loop by one round.

Run it directly (`python -m flows.oel_iteration`, what `make run` does; a temporary Prefect server
is started when none is configured) or through the served deployment (`make serve`, then
`prefect deployment run 'oel-iteration/oel-iteration' --watch`).

The flow holds no ML logic: every stage is a task named after it (collect, extract, consolidate, distill,
eval, with headroom before distill) running `dvc repro <stage>@<round>`; the round's MLflow run spans the
iteration. After eval the `promote` task runs the promotion gate (oel.rounds): the round becomes `champion` in
the MLflow registry or stays `challenger`, and the next round is declared `from:` the champion.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows._dvc import dvc_repro
from oel import rounds
from oel.config import STAGES, load_params
from oel.env import setup_env
from oel.log import setup_logging
from oel.paths import ProjectPaths


def project_params(params_file: str) -> Path:
    """The project's params.yaml; its folder is the project root DVC runs in."""
    path = Path(params_file).resolve()
    if path.name != "params.yaml":
        # dvc.yaml's stages and `${rounds}` read params.yaml; any other file would be silently ignored.
        raise rounds.RoundError(f"{params_file}: pass the project's params.yaml (DVC reads no other file); "
                                f"copy your settings into it or use `dvc exp run -S key=value`")
    if not path.is_file():
        raise rounds.RoundError(f"{path}: no such file; run from the project root or pass params_file")
    return path


def round_targets(root: Path, round_id: str) -> list[str]:
    """DVC targets of one iteration, in pipeline order; round 0 (base + its eval) first when missing."""
    base_done = (ProjectPaths(root).policy_dir("base") / "policy.json").is_file()
    baseline_done = rounds.is_done(root, "base")
    first = ([] if base_done else ["base"]) + ([] if baseline_done else ["eval_base"])
    return first + [f"{stage}@{round_id}" for stage in STAGES]


@task(name="plan", task_run_name="plan", cache_policy=NO_CACHE)
def plan_round(params_path: Path, round_id: str | None, start_from: str | None = None) -> rounds.RoundPlan:
    picked = rounds.plan(params_path, round_id, start_from)
    note = "declared now in params.yaml" if picked.declared_now else "already declared"
    get_run_logger().info("round %s from policy %s (%s)", picked.round_id, picked.start_from, note)
    return picked


@task(task_run_name="record@{round_id}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def record(params_path: Path, round_id: str) -> list[str]:
    """Stores, a trajectory sample, plots and the adapter onto the round's MLflow iteration run; the round's
    report rows and knowledge items as Prefect artifacts (flows._artifacts)."""
    from flows._artifacts import publish_round
    from oel.tracking import log_round_artifacts

    root = params_path.parent
    params = load_params(params_path)
    logged = log_round_artifacts(params, round_id, root=root)
    keys = publish_round(params, root, round_id)
    get_run_logger().info("logged %d artifacts to MLflow run 'iteration %s'; Prefect artifacts %s", len(logged),
                          round_id, ", ".join(keys))
    return logged


@task(name="promote", task_run_name="promote@{round_id}", cache_policy=NO_CACHE)
def promote_round(params_path: Path, round_id: str) -> dict:
    """The promotion gate on the round's eval: champion or challenger, mirrored into the MLflow registry."""
    from oel.rounds.lifecycle import promote
    from oel.rounds.registry import register_round

    params, root = load_params(params_path), params_path.parent
    decision = promote(params, root, round_id)
    registry = register_round(params, root, decision)
    get_run_logger().info("promotion@%s: %s; %s", round_id, decision.decision, decision.reason)
    return {**decision.dump(), "registry": registry, "served": _follow(params, root)}


def _follow(params, root: Path) -> dict[str, float] | None:
    """A running `oel serve` routes to the champion now; serving trouble is logged, the decision stands."""
    from oel.errors import UserError
    from oel.online.stack import route

    try:
        served = route(params, root)
    except UserError as err:
        get_run_logger().warning("the gateway was not moved: %s", err)
        return None
    if served is not None:
        get_run_logger().info("gateway %s now routes %s", params.serve.endpoint, served)
    return served


@flow(name="oel-iteration", log_prints=False)
def oel_iteration(params_file: str = "params.yaml", round_id: str | None = None,
                  lock_timeout: float = rounds.DEFAULT_LOCK_TIMEOUT, start_from: str | None = None) -> str:
    """Run one OEL round: collect -> extract -> consolidate -> headroom -> distill -> eval, then the gate.

    Args:
        params_file: the project's params.yaml; its folder is the project root (data/, models/, dvc.yaml).
        round_id: the round to run (e.g. "r2"). Default: the first declared round without eval metrics,
            or else the next round, which is declared in params.yaml as `r<N+1>: {from: r<N>}`.
        lock_timeout: seconds to wait for another iteration of the same project to finish before failing.
        start_from: the policy a newly declared round starts from: a round id, base, or an alias (champion,
            challenger); default: the promotion gate's champion. Written to params.yaml as a round id.

    Returns the round id that ran. Hyperparameters are not flow parameters: they live in params.yaml.
    """
    params_path = project_params(params_file)
    root = params_path.parent
    setup_env(root)  # a served deployment calls the flow directly: the project's stores resolve against root
    if start_from is not None:  # an unknown name fails before the lock is taken or any gate writes a file
        from oel.rounds.lifecycle import check_name

        check_name(start_from, load_params(params_path))
    with rounds.iteration_lock(root, lock_timeout):
        from oel.rounds.lifecycle import undecided

        for pending in undecided(load_params(params_path), root):  # evaluated without the flow (dvc repro)
            promote_round(params_path, pending)
        picked = plan_round(params_path, round_id, start_from)
        with iteration_run(params_path, picked.round_id):
            for target in round_targets(root, picked.round_id):
                stage_task(target)(target, root)
            record(params_path, picked.round_id)
            promote_round(params_path, picked.round_id)
    return picked.round_id


def stage_task(target: str):
    """The dvc-repro task named after its stage (`collect`, ..., `eval`; `base`, `eval_base` for round 0)."""
    return dvc_repro.with_options(name=target.partition("@")[0])


@contextlib.contextmanager
def iteration_run(params_path: Path, round_id: str):
    """The round's MLflow run, open from the round's start to its end, closed with the round's status."""
    from oel.tracking import begin_iteration, end_iteration

    params = load_params(params_path)
    begin_iteration(params, round_id)
    ok = False
    try:
        yield
        ok = True
    finally:
        end_iteration(params, round_id, ok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one OEL iteration (one round) through Prefect.")
    parser.add_argument("--params", default="params.yaml", help="the project's params.yaml")
    parser.add_argument("--round", dest="round_id", default=None, help="round id (default: the next one)")
    parser.add_argument("--from", dest="start_from", default=None,
                        help="policy a new round starts from: a round, base, champion or challenger (default: champion)")
    args = parser.parse_args(argv)
    setup_env(Path(args.params).resolve().parent)
    setup_logging()
    state = oel_iteration(params_file=args.params, round_id=args.round_id, start_from=args.start_from,
                          return_state=True)
    if state.is_completed():
        logging.getLogger("flows").info("round %s done", state.result())
        return 0
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

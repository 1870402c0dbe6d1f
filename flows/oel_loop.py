"""`oel-loop`: run `oel-iteration` N times in a row, each one a subflow run (one round each)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger

from flows.oel_iteration import oel_iteration
from oel.config import load_params
from oel.env import setup_env
from oel.rounds import DEFAULT_LOCK_TIMEOUT


@flow(name="oel-loop")
def oel_loop(rounds: int | None = None, params_file: str = "params.yaml",
             lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> list[str]:
    """Advance the loop by `rounds` rounds; each picks or declares its round like `oel-iteration`.

    Args:
        rounds: how many iterations (rounds) to run, one after the other; default `loop.rounds` of the
            params (2, or the paper preset's count).
        params_file: the project's params.yaml; its folder is the project root.
        lock_timeout: seconds each iteration waits for another iteration of the project to finish.

    Returns the round ids that ran. A failed iteration fails the loop; later rounds are not started.
    """
    if rounds is None:
        rounds = load_params(params_file).loop.rounds
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: run at least one iteration")
    done: list[str] = []
    for i in range(rounds):
        done.append(oel_iteration(params_file=params_file, lock_timeout=lock_timeout))
        get_run_logger().info("iteration %d/%d: round %s done", i + 1, rounds, done[-1])
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run N OEL iterations through Prefect.")
    parser.add_argument("--rounds", type=int, default=None, help="default: loop.rounds of the params")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_env(Path(args.params).resolve().parent)
    state = oel_loop(rounds=args.rounds, params_file=args.params, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Reference pass rates of the games layer: a random-valid policy and the solver on held-out seeds.

Rerun from the project root:  .venv/bin/python scripts/baselines.py [--episodes 200] [--textworld-episodes 30]
Writes reports/baselines.md. Uses the games section of params.yaml and the held-out seeds of oel.seeds
(the ones eval plays every round), so the numbers bound what a policy can score there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from pathlib import Path

from oel.artifacts import write_text
from oel.config import load_params
from oel.games import make_game
from oel.seeds import episode_seeds

ROOT = Path(__file__).resolve().parents[1]


def play(game: str, games, seeds: list[int], policy: str) -> tuple[float, int, float]:
    """(pass rate, env steps, seconds) of `policy` ('random' or 'solver') over `seeds`."""
    wins = steps = 0
    start = time.perf_counter()
    for seed in seeds:
        session = make_game(game, games, ROOT)
        session.reset(seed)
        rng = random.Random(seed)
        plan = list(session.solution() or []) if policy == "solver" else []
        result = None
        while result is None or not result.done:
            if policy == "solver":
                action = plan.pop(0) if plan else "no plan"
            else:
                action = rng.choice(session.legal_actions() or ["none"])
            result = session.step(f"[{action}]")
            steps += 1
        wins += result.success
    return wins / len(seeds), steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200, help="held-out seeds per grid game")
    parser.add_argument("--textworld-episodes", type=int, default=30,
                        help="held-out seeds for TextWorld (each new game costs ~3 s of tw-make)")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    rows = []
    for game in ("frozenlake", "sokoban", "textworld"):
        n = args.textworld_episodes if game == "textworld" else args.episodes
        seeds = episode_seeds(params.seed, game, "heldout", None, n)
        gen = time.perf_counter()
        for seed in seeds:  # generate/load every game first so the timings below measure play only
            make_game(game, params.games, ROOT).reset(seed)
        gen = time.perf_counter() - gen
        for policy in ("random", "solver"):
            rate, steps, secs = play(game, params.games, seeds, policy)
            rows.append((game, policy, n, rate, steps, steps / secs))
            print(f"{game:10s} {policy:6s} n={n} pass={rate:.3f} steps/s={steps / secs:.0f}")
        print(f"{game}: first pass over the seeds (incl. any generation) {gen:.1f}s")
    g = params.games
    lines = [
        "# Game baselines",
        "",
        f"Command: `.venv/bin/python scripts/baselines.py --episodes {args.episodes} "
        f"--textworld-episodes {args.textworld_episodes}`  ",
        f"Date: {dt.date.today().isoformat()}  ",
        f"Seeds: held-out seeds of `oel.seeds.episode_seeds(seed={params.seed}, game, 'heldout', None, n)` "
        "(the seeds eval plays every round).  ",
        f"Games: FrozenLake {g.frozenlake.size}x{g.frozenlake.size}, {g.frozenlake.num_holes} holes, "
        f"{g.frozenlake.max_calls} calls; Sokoban {tuple(g.sokoban.dim_room)}, {g.sokoban.num_boxes} box, "
        f"{g.sokoban.max_calls} calls; TextWorld {', '.join(g.textworld.challenges)} level "
        f"{g.textworld.level}, {g.textworld.max_turns} calls.",
        "",
        "| game | policy | episodes | pass rate | env steps/s |",
        "| --- | --- | ---: | ---: | ---: |",
        *[f"| {game} | {policy} | {n} | {rate:.3f} | {sps:,.0f} |" for game, policy, n, rate, _, sps in rows],
        "",
        "- **random**: each call picks uniformly among the moves the env accepts now (grid: moves that are "
        "not into a wall/off the grid; TextWorld: the admissible commands), seeded by the episode seed.",
        "- **solver**: BFS shortest plan from the start (grid games) or the game's walkthrough (TextWorld), "
        "played within the same call budget; a plan longer than the budget fails. Sokoban's solver rate is "
        "therefore the share of rooms solvable within the budget, the ceiling for any policy.",
        "- env steps/s: `step()` calls per second including `reset()` (TextWorld: loading a cached game; "
        "generation excluded), single process, on the shared 2-core project machine.",
        "",
    ]
    write_text(ROOT / "reports" / "baselines.md", "\n".join(lines))


if __name__ == "__main__":
    main()

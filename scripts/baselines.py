"""Reference pass rates of the games layer: a random-valid policy and the solver on held-out seeds.

Rerun from the project root:
  .venv/bin/python scripts/baselines.py [--episodes 200] [--textworld-episodes 100]
      [--textworld tw-coin_collector:1:8 --textworld tw-treasure_hunter:5:12 ...]
Writes reports/baselines.md. Uses the games section of params.yaml and the held-out seeds of oel.seeds
(the ones eval plays every round), so the numbers bound what a policy can score there. Each --textworld
CHALLENGE:LEVEL:MAX_TURNS is measured on its own (default: the TextWorld setting of params.yaml).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from oel.artifacts import write_text
from oel.config import GamesParams, TextWorldParams, load_params
from oel.games import make_game
from oel.games.twmake import GAME_FILE, challenge_for_seed, game_dir
from oel.metrics import wilson_interval
from oel.paths import ProjectPaths
from oel.seeds import episode_seeds

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("random", "solver")


@dataclass(frozen=True)
class Row:
    game: str
    setting: str
    policy: str
    n: int
    wins: int
    steps_per_s: float


@dataclass(frozen=True)
class Shape:
    """What the first observation of a TextWorld setting looks like, and what its games cost to make."""
    setting: str
    generated: int
    gen_s_per_game: float | None
    obs_chars: float
    commands: float
    plan_len: float
    plan_max: int


def play(game: str, games: GamesParams, seeds: list[int], policy: str) -> tuple[int, int, float]:
    """(wins, env steps, seconds) of `policy` ('random' or 'solver') over `seeds`."""
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
    return wins, steps, time.perf_counter() - start


def measure(game: str, setting: str, games: GamesParams, seeds: list[int]) -> list[Row]:
    rows = []
    for policy in POLICIES:
        wins, steps, secs = play(game, games, seeds, policy)
        rows.append(Row(game, setting, policy, len(seeds), wins, steps / secs))
        low, high = wilson_interval(wins, len(seeds))
        print(f"{game:10s} {setting:32s} {policy:6s} n={len(seeds)} pass={wins / len(seeds):.3f} "
              f"[{low:.3f}, {high:.3f}] steps/s={steps / secs:.0f}")
    return rows


def textworld_shape(setting: str, games: GamesParams, seeds: list[int]) -> Shape:
    """Generate (or load) every game first, timing the generations, so play timings measure play only."""
    tw = games.textworld
    cache = ProjectPaths(ROOT).textworld_cache
    gen_times, chars, commands, plans = [], [], [], []
    for seed in seeds:
        cached = (game_dir(cache, challenge_for_seed(seed, list(tw.challenges)), tw.level, seed)
                  / GAME_FILE).is_file()
        start = time.perf_counter()
        session = make_game("textworld", games, ROOT)
        first = session.reset(seed)
        if not cached:
            gen_times.append(time.perf_counter() - start)
        chars.append(len(first))
        commands.append(len(session.legal_actions()))
        plans.append(len(session.solution() or []))
        session.close()
    shape = Shape(setting, len(gen_times), statistics.mean(gen_times) if gen_times else None,
                  statistics.mean(chars), statistics.mean(commands), statistics.mean(plans), max(plans))
    gen = f"{shape.gen_s_per_game:.2f}s/game over {shape.generated}" if gen_times else "all cached"
    print(f"textworld  {setting:32s} generation {gen}; first observation {shape.obs_chars:.0f} chars, "
          f"{shape.commands:.1f} commands; walkthrough {shape.plan_len:.1f} (max {shape.plan_max}) moves")
    return shape


def parse_setting(text: str, base: TextWorldParams) -> TextWorldParams:
    """CHALLENGE:LEVEL:MAX_TURNS -> the params' TextWorld section with those three replaced."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise SystemExit(f"--textworld {text!r}: expected CHALLENGE:LEVEL:MAX_TURNS, e.g. tw-treasure_hunter:5:12")
    fields = {**base.model_dump(), "challenges": [parts[0]], "level": int(parts[1]), "max_turns": int(parts[2])}
    try:
        return TextWorldParams(**fields)
    except ValueError as err:
        raise SystemExit(f"--textworld {text!r}: {str(err).splitlines()[-1].strip()}") from None


def setting_name(tw: TextWorldParams) -> str:
    return f"{'+'.join(tw.challenges)} level {tw.level}, {tw.max_turns} calls"


def grid_setting(game: str, games: GamesParams) -> str:
    if game == "frozenlake":
        g = games.frozenlake
        return f"{g.size}x{g.size}, {g.num_holes} holes, {g.max_calls} calls"
    g = games.sokoban
    return f"{tuple(g.dim_room)}, {g.num_boxes} box, {g.max_calls} calls"


def report(base_seed: int, rows: list[Row], shapes: list[Shape]) -> str:
    command = " ".join(["scripts/baselines.py", *sys.argv[1:]])
    lines = [
        "# Game baselines",
        "",
        f"Command: `.venv/bin/python {command}`  ",
        f"Date: {dt.date.today().isoformat()}  ",
        f"Seeds: held-out seeds of `oel.seeds.episode_seeds(seed={base_seed}, game, 'heldout', None, n)` "
        "(the seeds eval plays every round).",
        "",
        "| game | setting | policy | n | pass rate | 95% Wilson interval | env steps/s |",
        "| --- | --- | --- | ---: | ---: | :---: | ---: |",
        *[_row_line(r) for r in rows],
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
    if shapes:
        lines += [
            "## TextWorld settings: prompt size and generation cost",
            "",
            "| setting | tw-make s/game | games generated | first observation chars | admissible commands "
            "| walkthrough moves (max) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *[_shape_line(s) for s in shapes],
            "",
            "- tw-make s/game: wall seconds of one `tw-make` generation (cold cache), single process, on the "
            "shared 2-core machine; a cached game loads in well under a second.",
            "- first observation chars and admissible commands: means over the seeds, at reset (objective, "
            "room text and the bracketed command list, as the policy sees it).",
            "",
        ]
    return "\n".join(lines)


def _row_line(r: Row) -> str:
    low, high = wilson_interval(r.wins, r.n)
    return (f"| {r.game} | {r.setting} | {r.policy} | {r.n} | {r.wins / r.n:.3f} | [{low:.3f}, {high:.3f}] "
            f"| {r.steps_per_s:,.0f} |")


def _shape_line(s: Shape) -> str:
    gen = f"{s.gen_s_per_game:.2f}" if s.gen_s_per_game is not None else "cached"
    return (f"| {s.setting} | {gen} | {s.generated} | {s.obs_chars:.0f} | {s.commands:.1f} "
            f"| {s.plan_len:.1f} ({s.plan_max}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200, help="held-out seeds per grid game")
    parser.add_argument("--textworld-episodes", type=int, default=100,
                        help="held-out seeds per TextWorld setting (each new game costs seconds of tw-make)")
    parser.add_argument("--textworld", action="append", metavar="CHALLENGE:LEVEL:MAX_TURNS",
                        help="a TextWorld setting to measure (repeatable; default: the one in params.yaml)")
    parser.add_argument("--games", nargs="+", default=["frozenlake", "sokoban", "textworld"],
                        choices=["frozenlake", "sokoban", "textworld"])
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    rows: list[Row] = []
    shapes: list[Shape] = []
    for game in [g for g in args.games if g != "textworld"]:
        seeds = episode_seeds(params.seed, game, "heldout", None, args.episodes)
        rows += measure(game, grid_setting(game, params.games), params.games, seeds)
    if "textworld" in args.games:
        seeds = episode_seeds(params.seed, "textworld", "heldout", None, args.textworld_episodes)
        base = params.games.textworld
        for tw in [parse_setting(s, base) for s in args.textworld] if args.textworld else [base]:
            games = GamesParams(**{**params.games.model_dump(), "textworld": tw.model_dump()})
            shapes.append(textworld_shape(setting_name(tw), games, seeds))
            rows += measure("textworld", setting_name(tw), games, seeds)
    write_text(ROOT / "reports" / "baselines.md", report(params.seed, rows, shapes))


if __name__ == "__main__":
    main()

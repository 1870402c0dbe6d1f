"""Held-out metrics from played episodes: pure arithmetic, no model, no files.

Definitions (the reference code's textgame eval, paper §5), all pooled over episodes or turns:
  pass_rate                  fraction of episodes with reward 1 (Episode.success) -- `held_out_acc`
  pass_ci_low / pass_ci_high 95% Wilson score interval of pass_rate
  response_tokens_per_turn   mean generated tokens per model call, over every turn of every episode
                             (thinking included) -- `avg_response_length`
  turns_per_game             mean model calls per episode -- `avg_num_steps`
  tokens_per_game            mean total response tokens per episode -- `avg_traj_tokens`
  invalid_action_rate        fraction of turns whose action the game rejected (or could not parse)
  invalid_ci_low / _high     its 95% interval, with the turns of one game counted as one cluster (below)
  tokens_per_turn_ci_low / _high   the same for response_tokens_per_turn (from 2 games with turns on)

Turn-level rates are ratios of per-game sums, and the turns of one game are not independent (a policy that
cannot format an action fails every turn of that game), so a binomial interval over turns would be too narrow.
Their intervals use the ratio estimator's linearised variance over games (games are the independent units):
a Wilson interval at the design-effect sample size for the invalid-action rate (it stays inside [0, 1] at
rates near 0 or 1, where small policies sit), a normal one for tokens per turn.

Per game first: every block is keyed by game, plus `overall` (OVERALL), which pools the games' episodes.
The key stays `overall` for readers of reports/<r>/eval.json (plots, report); anything shown to a person names
it POOLED ("pooled"), since a number pooled across games mixes games of very different difficulty.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from oel.schemas import Episode

Z95 = 1.959963984540054  # two-sided 95% normal quantile
Z80 = 0.8416212335729143  # one-sided normal quantile of 80% power
OVERALL = "overall"   # the key of the block pooled over every game
POOLED = "pooled"     # how reports and logs label that block


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Chosen over the normal (Wald) interval because eval sets are small (16-128 games) and pass rates sit
    near 0 for small models, where Wald collapses to [0, 0]; Wilson stays inside [0, 1] and is non-empty.
    With n == 0 there is no information: (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in [0, n={n}]")
    # Exact ends at 0 or n win inside _wilson: float rounding otherwise leaves the bound a hair inside.
    return _wilson(successes / n, n, z)


def detectable_difference(n: int, p: float = 0.5) -> float:
    """The smallest change in a rate that two evals of n games each tell apart from noise (two-sided 95%,
    80% power, normal approximation) when the rate is near p. p = 0.5 is the worst case: rates near 0 or 1
    resolve smaller changes. 100 games per game give 19.8 points, the issue-18 target of 20."""
    if n <= 0:
        return 1.0
    return min(1.0, (Z95 + Z80) * math.sqrt(2 * p * (1 - p) / n))


def clustered_rate_interval(per_game: Sequence[tuple[int, int]], z: float = Z95) -> tuple[float, float]:
    """95% interval of sum(events) / sum(trials) over games given as (events, trials), e.g. (invalid turns,
    turns): Wilson at the effective sample size trials / design effect, the design effect being the ratio
    estimator's clustered variance over the binomial one, at least 1 (never narrower than the binomial
    interval over trials). At a rate of 0 or 1, or with one game, there is no spread to measure: Wilson over
    the trials. No trials: (0, 1)."""
    trials = sum(m for _, m in per_game)
    if trials <= 0:
        return 0.0, 1.0
    events = sum(y for y, _ in per_game)
    rate = events / trials
    n_eff = float(trials)
    var = _ratio_variance(per_game, rate, trials)
    if var is not None and var > 0 and 0 < rate < 1:
        n_eff = min(float(trials), max(1.0, rate * (1 - rate) / var))
    return _wilson(rate, n_eff, z)


def clustered_mean_interval(per_game: Sequence[tuple[float, int]], z: float = Z95) -> tuple[float, float] | None:
    """95% normal interval of sum(values) / sum(counts) over games given as (value sum, count), e.g. (response
    tokens, turns); None with fewer than 2 games that have counts (no variance to estimate)."""
    counts = sum(m for _, m in per_game)
    if counts <= 0:
        return None
    mean = sum(y for y, _ in per_game) / counts
    var = _ratio_variance(per_game, mean, counts)
    if var is None:
        return None
    half = z * math.sqrt(var)
    return max(0.0, mean - half), mean + half


def _ratio_variance(per_game: Sequence[tuple[float, int]], ratio: float, total: int) -> float | None:
    """Linearised (Taylor) variance of the ratio estimator sum(y) / sum(m), games as clusters; None below 2."""
    games = [(y, m) for y, m in per_game if m > 0]
    n = len(games)
    if n < 2:
        return None
    return n / (n - 1) * sum((y - ratio * m) ** 2 for y, m in games) / total ** 2


def _wilson(p: float, n: float, z: float) -> tuple[float, float]:
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if p <= 0 else max(0.0, centre - half)
    high = 1.0 if p >= 1 else min(1.0, centre + half)
    return low, high


def passed(episode: Episode) -> bool:
    # Games set success exactly when the reward is 1 (grid games) or the game is won (TextWorld).
    return bool(episode.success)


def invalid_by_game(episodes: Sequence[Episode]) -> list[tuple[int, int]]:
    """(invalid turns, turns) of each game: the clusters of the invalid-action rate."""
    return [(sum(not t.valid for t in ep.turns), len(ep.turns)) for ep in episodes]


def tokens_by_game(episodes: Sequence[Episode]) -> list[tuple[int, int]]:
    """(response tokens, turns) of each game: the clusters of tokens per turn."""
    return [(sum(t.response_tokens for t in ep.turns), len(ep.turns)) for ep in episodes]


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """The metric block of one group of episodes (a game, a store, or everything)."""
    n = len(episodes)
    wins = sum(passed(ep) for ep in episodes)
    # Per game (its sum, its turns): the pooled rates are their ratios, the intervals take games as clusters.
    invalid_pairs, token_pairs = invalid_by_game(episodes), tokens_by_game(episodes)
    n_turns = sum(m for _, m in invalid_pairs)
    invalid = sum(y for y, _ in invalid_pairs)
    tokens = sum(y for y, _ in token_pairs)
    low, high = wilson_interval(wins, n)
    invalid_low, invalid_high = clustered_rate_interval(invalid_pairs)
    tokens_ci = clustered_mean_interval(token_pairs)
    return {
        "pass_rate": wins / n if n else 0.0,
        "pass_ci_low": low,
        "pass_ci_high": high,
        "response_tokens_per_turn": tokens / n_turns if n_turns else 0.0,
        "turns_per_game": n_turns / n if n else 0.0,
        "tokens_per_game": tokens / n if n else 0.0,
        "invalid_action_rate": invalid / n_turns if n_turns else 0.0,
        "invalid_ci_low": invalid_low,
        "invalid_ci_high": invalid_high,
        **({"tokens_per_turn_ci_low": tokens_ci[0], "tokens_per_turn_ci_high": tokens_ci[1]} if tokens_ci else {}),
        "turns": n_turns,
        "episodes": n,
        "passed": wins,
    }


def by_game(episodes: Iterable[Episode]) -> dict[str, dict[str, float]]:
    """Per-game blocks, then `overall` (pooled over every episode of every game; games have equal seed counts)."""
    groups: dict[str, list[Episode]] = defaultdict(list)
    everything: list[Episode] = []
    for ep in episodes:
        groups[ep.game].append(ep)
        everything.append(ep)
    out = {game: episode_metrics(eps) for game, eps in sorted(groups.items())}
    out[OVERALL] = episode_metrics(everything)
    return out


def by_store(episodes: Iterable[Episode]) -> dict[str, dict[str, dict[str, float]]]:
    """Teacher-level blocks: `store_<k>` for each store index, and `mean` pooled over all stores.

    Stores are per game, so `store_<k>.<game>` is that game's store k and `mean.<game>` pools that game's
    stores only; the `overall` blocks pool across games."""
    groups: dict[int, list[Episode]] = defaultdict(list)
    for ep in episodes:
        if ep.knowledge_store is None:
            raise ValueError(f"episode {ep.episode_id} has no knowledge_store; it is not a teacher-level episode")
        groups[ep.knowledge_store].append(ep)
    out = {f"store_{k}": by_game(eps) for k, eps in sorted(groups.items())}
    out["mean"] = by_game(ep for eps in groups.values() for ep in eps)
    return out


def headroom(teacher: dict[str, dict[str, float]], plain: dict[str, dict[str, float]]) -> dict[str, float]:
    """Teacher pass rate minus the same policy's no-knowledge pass rate, per game present in both."""
    return {game: teacher[game]["pass_rate"] - plain[game]["pass_rate"]
            for game in teacher if game in plain}


DIGITS = 4  # the DVC metrics files round to this: `dvc metrics show` columns stay narrow


def dvc_metrics(details: dict) -> dict[str, dict[str, float]]:
    """eval's breakdown -> the few numbers per file that `dvc metrics show` prints, one row per file.

    Per game (file `<game>`): pass (held-out pass rate), teacher (teacher level, the mean over the game's
    stores), gain (headroom: teacher minus the start policy without knowledge), invalid (invalid-action
    rate), tokens (response tokens per turn); teacher and gain only when the round has a teacher level.
    File `ood`, when the probe ran: pass (instruction pass rate) and gain (its change vs the base round).
    """
    teacher = details.get("teacher", {}).get("mean", {})
    gains = details.get("headroom", {})
    out: dict[str, dict[str, float]] = {}
    for game, block in details.get("heldout", {}).items():
        if game == OVERALL:
            continue
        row = {"pass": block["pass_rate"]}
        if game in teacher:
            row["teacher"] = teacher[game]["pass_rate"]
        if game in gains:
            row["gain"] = gains[game]
        row |= {"invalid": block["invalid_action_rate"], "tokens": block["response_tokens_per_turn"]}
        out[game] = row
    if "ood" in details:
        ood = details["ood"]
        out["ood"] = {"pass": ood["instruction_pass"]}
        if "instruction_pass_delta" in ood:
            out["ood"]["gain"] = ood["instruction_pass_delta"]
    return {name: {k: round(float(v), DIGITS) for k, v in row.items()} for name, row in out.items()}

"""Paired comparisons of two policies on the same held-out units (games, or OOD prompts): pure, scipy.

The gate asks one question of every headline metric: is the candidate *worse* than the champion by more
than the metric's margin, beyond what the sampling noise of this held-out set explains? Both policies play
the same seeds, so each game (or prompt) is a pair, and a paired test has far more power than comparing two
intervals: two policies that fail the same games differ by nothing, however wide each interval is.

- Success per game (pass rate) and per prompt (OOD instruction pass): the exact McNemar test, i.e. a
  one-sided binomial test on the discordant pairs (scipy.stats.binomtest): among the units where exactly one
  policy succeeded, did the champion win more often than a fair coin would? It tests "no difference", so a
  non-zero margin is applied to the observed drop on top of it: blocked when p < alpha AND drop > margin.
- Turn-level rates (invalid actions per turn, tokens per turn): ratios of per-game sums whose turns are not
  independent, so the unit is the game: a paired bootstrap that resamples games, both policies' sums of a game
  together (scipy.stats.bootstrap, paired=True). It tests "worse by at most the margin": blocked when the
  one-sided (1 - alpha) lower bound of the deterioration exceeds the margin; p is the share of resamples
  whose deterioration is at most the margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Below this many paired units there is no spread to test: such a comparison never blocks, and says so.
MIN_PAIRS = 2


@dataclass(frozen=True)
class Paired:
    """One metric's comparison. `worse_by` is in the margin's unit: absolute for rates, relative for tokens."""

    test: str
    pairs: int
    candidate: float
    champion: float
    worse_by: float
    margin: float
    p_value: float | None
    ci_low: float | None  # one-sided lower bound of worse_by (bootstrap only)
    blocked: bool
    discordant: int | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def successes(candidate: Sequence[bool], champion: Sequence[bool], margin: float, alpha: float) -> Paired:
    """Exact McNemar on paired successes (index i of both lists is the same game or prompt)."""
    from scipy.stats import binomtest

    a, b = np.asarray(candidate, dtype=bool), np.asarray(champion, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"unpaired inputs: {a.size} candidate vs {b.size} champion outcomes")
    n = int(a.size)
    cand_rate, champ_rate = (float(a.mean()), float(b.mean())) if n else (0.0, 0.0)
    losses, wins = int((b & ~a).sum()), int((a & ~b).sum())  # the champion's wins are the candidate's losses
    drop = champ_rate - cand_rate
    if n < MIN_PAIRS:
        return Paired("exact McNemar", n, cand_rate, champ_rate, drop, margin, None, None, False, losses + wins,
                      note=f"{n} paired units: too few to test")
    p = float(binomtest(losses, losses + wins, 0.5, alternative="greater").pvalue) if losses + wins else 1.0
    return Paired("exact McNemar", n, cand_rate, champ_rate, drop, margin, p, None,
                  p < alpha and drop > margin, losses + wins)


def proportions(candidate: tuple[int, int], champion: tuple[int, int], margin: float, alpha: float) -> Paired:
    """Two rates known only as (successes, n) each, no unit in common to pair (IFEval reports its scores
    alone): one-sided Fisher's exact test that the candidate's rate is lower; blocked when p < alpha AND the
    drop exceeds the margin."""
    from scipy.stats import fisher_exact

    (a, n), (b, m) = candidate, champion
    cand, champ = (a / n if n else 0.0), (b / m if m else 0.0)
    if not n or not m:
        return Paired("Fisher exact, unpaired", 0, cand, champ, champ - cand, margin, None, None, False,
                      note="no prompt counts: nothing to test")
    p = float(fisher_exact([[a, n - a], [b, m - b]], alternative="less").pvalue)
    return Paired("Fisher exact, unpaired", min(n, m), cand, champ, champ - cand, margin, p, None,
                  p < alpha and champ - cand > margin)


def ratio(candidate: Sequence[tuple[float, int]], champion: Sequence[tuple[float, int]], margin: float,
          alpha: float, *, relative: bool, resamples: int, seed: int) -> Paired:
    """Paired cluster bootstrap of sum(y) / sum(m), higher is worse; index i of both lists is the same game,
    each given as (events or tokens, turns). relative: deterioration as candidate / champion - 1."""
    from scipy.stats import bootstrap

    if len(candidate) != len(champion):
        raise ValueError(f"unpaired inputs: {len(candidate)} candidate vs {len(champion)} champion games")
    yc, mc = (np.asarray(col, dtype=float) for col in zip(*candidate, strict=True)) if candidate else ([], [])
    yb, mb = (np.asarray(col, dtype=float) for col in zip(*champion, strict=True)) if champion else ([], [])
    n = len(candidate)
    cand = _ratio(np.asarray(yc), np.asarray(mc))
    champ = _ratio(np.asarray(yb), np.asarray(mb))
    test = "paired bootstrap, games as clusters"

    def worse(yc, mc, yb, mb, axis=-1):
        c, b = _ratio(yc, mc, axis), _ratio(yb, mb, axis)
        if not relative:
            return c - b
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0, c / np.where(b > 0, b, 1.0) - 1.0, 0.0)

    observed = float(worse(np.asarray(yc), np.asarray(mc), np.asarray(yb), np.asarray(mb)))
    if n < MIN_PAIRS or not np.isfinite(observed):
        return Paired(test, n, cand, champ, observed if np.isfinite(observed) else 0.0, margin, None, None, False,
                      note=f"{n} paired games: too few to test")
    if relative and champ <= 0:
        return Paired(test, n, cand, champ, 0.0, margin, None, None, False, note="champion's value is 0")
    res = bootstrap((yc, mc, yb, mb), worse, paired=True, vectorized=True, n_resamples=resamples,
                    confidence_level=1 - alpha, alternative="greater", method="percentile",
                    rng=np.random.default_rng(seed))
    low = float(res.confidence_interval.low)
    dist = np.asarray(res.bootstrap_distribution)
    if not np.isfinite(low):  # every resample identical (no spread between games): the observed value is exact
        low = observed
    # (k + 1) / (B + 1), the bootstrap p-value that counts the observed sample as one of the resamples: never 0,
    # which no finite number of resamples can show.
    p = float((np.sum(dist <= margin) + 1) / (dist.size + 1)) if dist.size else 1.0
    return Paired(test, n, cand, champ, observed, margin, p, low, low > margin)


def _ratio(y, m, axis=-1):
    y, m = np.asarray(y, dtype=float), np.asarray(m, dtype=float)
    if y.size == 0:
        return 0.0
    total = m.sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total > 0, y.sum(axis=axis) / np.where(total > 0, total, 1.0), 0.0)
    return float(out) if np.ndim(out) == 0 else out

"""Every artifact path of the project, and nowhere else.

dvc.yaml repeats these paths (DVC needs them literally); tests/unit/test_pipeline_contract.py checks the two agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STORE_FILE = re.compile(r"^store-(\d+)\.md$")

CACHE_DIR = ".cache"  # converted models, generated TextWorld games: rebuildable, gitignored


@dataclass(frozen=True)
class ProjectPaths:
    root: Path = Path(".")

    @property
    def cache(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def model_cache(self) -> Path:
        return self.cache / "models"

    @property
    def textworld_cache(self) -> Path:
        return self.cache / "textworld"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def policy_dir(self, policy: str) -> Path:
        """`base` or a round id -> its policy folder (each holds a policy.json manifest)."""
        return self.root / "models" / policy

    def round(self, round_id: str) -> RoundPaths:
        return RoundPaths(self.root, round_id)


@dataclass(frozen=True)
class RoundPaths:
    root: Path
    round_id: str

    @property
    def data(self) -> Path:
        return self.root / "data" / self.round_id

    @property
    def trajectories(self) -> Path:
        return self.data / "trajectories.jsonl"

    @property
    def knowledge(self) -> Path:
        return self.data / "knowledge"

    @property
    def items(self) -> Path:
        return self.knowledge / "items.jsonl"

    @property
    def extract_summary(self) -> Path:
        return self.knowledge / "extract_summary.json"

    @property
    def stores(self) -> Path:
        return self.knowledge / "stores"

    def game_stores(self, game: str) -> Path:
        """One game's stores: knowledge is per game (a store reads only that game's trajectories)."""
        return self.stores / game

    def store(self, game: str, k: int) -> Path:
        return self.game_stores(game) / f"store-{k}.md"

    def store_files(self) -> dict[str, list[tuple[int, Path]]]:
        """Each game's stores on disk by k (numbered, not sorted as text); games in name order."""
        if not self.stores.is_dir():
            return {}
        out = {}
        for folder in sorted(p for p in self.stores.iterdir() if p.is_dir()):
            found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := STORE_FILE.match(p.name)))
            if found:
                out[folder.name] = found
        return out

    def has_pooled_stores(self) -> bool:
        """Store files of the layout before knowledge was per game (stores/store-<k>.md)."""
        return self.stores.is_dir() and any(STORE_FILE.match(p.name) for p in self.stores.iterdir() if p.is_file())

    @property
    def distill_rows(self) -> Path:
        return self.data / "distill.jsonl"

    @property
    def model(self) -> Path:
        return self.root / "models" / self.round_id

    @property
    def checkpoints(self) -> Path:
        # Outside models/<round>: DVC deletes a stage's outs before rerunning it, and resume must survive that.
        return self.root / "checkpoints" / self.round_id

    @property
    def eval_dir(self) -> Path:
        return self.data / "eval"

    @property
    def eval_episodes(self) -> Path:
        return self.eval_dir / "episodes.jsonl"

    @property
    def report_dir(self) -> Path:
        return self.root / "reports" / self.round_id

    @property
    def details(self) -> Path:
        """eval's whole breakdown (every level, game, store, OOD), written last: its presence marks the
        round evaluated (oel.rounds.is_done). A plain DVC out, not a metrics file: too wide to read there."""
        return self.report_dir / "eval.json"

    @property
    def promotion(self) -> Path:
        """The promotion gate's decision for the round (oel.rounds.gate): champion or challenger, and why.
        Written after eval by `oel promote` / oel-iteration, not by DVC: it depends on the rounds before."""
        return self.report_dir / "promotion.json"

    @property
    def headroom(self) -> Path:
        """The headroom stage's verdict (teacher vs start policy on the round's own user-side seeds): whether
        distill trains, and why. A DVC out of headroom@<r>, a dep of distill@<r>."""
        return self.report_dir / "headroom.json"

    @property
    def headroom_episodes(self) -> Path:
        return self.data / "headroom" / "episodes.jsonl"

    @property
    def metrics_dir(self) -> Path:
        """The DVC metrics: metrics/<r>/<game>.json and ood.json, a few headline numbers each, so
        `dvc metrics show` prints one short row per file. At the root, not under reports/<r>/: the path
        column is the widest part of that table."""
        return self.root / "metrics" / self.round_id

    def metrics_file(self, name: str) -> Path:
        """One game's headline numbers (or `ood`)."""
        return self.metrics_dir / f"{name}.json"

    @property
    def plots(self) -> Path:
        return self.report_dir / "plots"

    @property
    def lock(self) -> Path:
        return self.root / "data" / f".{self.round_id}.lock"

"""What every stage's main() shares: environment, logging, params, the MLflow run, the summary."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oel.config import Params, load_params
from oel.env import setup_env
from oel.log import setup_logging
from oel.paths import ProjectPaths, RoundPaths

log = logging.getLogger(__name__)

RunFn = Callable[..., dict[str, Any]]


def stage_main(stage: str, run: RunFn, round_id: str, params_file: Path = Path("params.yaml"),
               root: Path = Path("."), track: bool = True, **options: Any) -> dict[str, Any]:
    """Load params, open `<stage>@<round>` in MLflow, call run(), log its numeric summary."""
    setup_env(root)
    setup_logging()
    params = load_params(params_file)
    if round_id != "base":
        params.policy_of(round_id)  # one clear error for an undeclared round
    paths = ProjectPaths(root).round(round_id)
    if stage in ("headroom", "eval"):
        check_stores(paths)
    # Under `accelerate launch` every process runs the stage; only rank 0 records it.
    track = track and int(os.environ.get("RANK", "0")) == 0
    if not track:
        return run(params, paths, **options)
    from oel import tracking

    with tracking.stage_run(stage, round_id, params):
        summary = run(params, paths, **options)
        tracking.log_metrics(numeric(summary))
        tracking.log_datasets(stage, params, paths)
    log.info("%s@%s done: %s", stage, round_id, _short(summary))
    return summary


def check_stores(paths: RoundPaths) -> None:
    """Eval (and `oel headroom`) read the round's stores as text; a store of random bytes would be a
    UnicodeDecodeError traceback mid-stage. Checked once, before any work, with one line naming the file."""
    from oel.artifacts import read_store

    for path in sorted(paths.stores.rglob("store-*.md")) if paths.stores.is_dir() else []:
        read_store(path)


def load_round_policy(params: Params, paths: RoundPaths):
    """The policy a round starts from, loaded with adapters merged (training puts a fresh adapter on top)."""
    from oel.models import load_model

    bind_rank_device()
    return load_model(round_policy_spec(params, paths), params.model, paths.root)


def bind_rank_device() -> None:
    """Under `accelerate launch` on CUDA each process owns GPU LOCAL_RANK. The load targets the *current* CUDA
    device ("cuda"), which is GPU 0 until told otherwise: without this, N ranks put N copies on GPU 0 before the
    trainer moves each to its own."""
    import torch

    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def round_policy_spec(params: Params, paths: RoundPaths) -> str:
    """The policy a round starts from as a spec build_backend or load_model takes (no weights loaded):
    its policy folder, or params.model for `base` when models/base is not built."""
    start = params.policy_of(paths.round_id) if paths.round_id != "base" else "base"
    policy_dir = ProjectPaths(paths.root).policy_dir(start)
    if (policy_dir / "policy.json").is_file():
        return str(policy_dir)
    if start == "base":
        return params.model.name
    from oel.errors import UserError

    raise UserError(f"{policy_dir}: round {start!r} has no policy yet; run `oel distill --round {start}` "
                    f"(or dvc repro) first")


def numeric(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested summaries to `a/b` metric names, keeping numbers only."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric(value, f"{name}/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def _short(summary: dict[str, Any]) -> str:
    flat = numeric(summary)
    return ", ".join(f"{k}={v:.3g}" for k, v in list(flat.items())[:8])


__all__ = ["Params", "RoundPaths", "stage_main", "numeric", "load_round_policy", "round_policy_spec"]

"""Prefect artifacts of a finished round: its report rows (with a link to its MLflow run) as markdown, and
its knowledge items as a table. Both keep one key per project across rounds, so the Prefect UI's Artifacts
page shows every round as a version of the same two artifacts (keys: lowercase letters, digits, dashes).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from oel.config import Params

MAX_ROWS = 500         # knowledge items in the table; a paper run writes thousands (items.jsonl has them all)
MAX_TEXT_CHARS = 300   # per item in the table; the stores hold the full text


def artifact_key(params: Params, what: str) -> str:
    """`<experiment>-<what>`, lowercased, every other character a dash (Prefect's key rule)."""
    slug = re.sub(r"[^a-z0-9]+", "-", params.tracking.experiment.lower()).strip("-") or "oel"
    return f"{slug}-{what}"


def mlflow_run_link(params: Params, round_id: str) -> str:
    """The round's iteration run in the MLflow UI: the tracking server itself, or what `make ui` serves."""
    from oel.tracking import _mlflow, iteration_run_id

    mlflow = _mlflow(params)
    run_id = iteration_run_id(params, round_id)
    exp_id = mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id
    uri = params.tracking.uri
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else \
        f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT', '5000')}"
    return f"{ui}/#/experiments/{exp_id}/runs/{run_id}"


def report_markdown(params: Params, root: Path, round_id: str, link: str) -> str:
    """The round's rows of `oel report` (per game, pooled), or its consolidation-gap row on chat logs."""
    from oel.rounds.report import games_table, load_metrics, logs_section, rounds_table

    metrics = {r: load_metrics(root, r) for r in ("base", round_id) if (root / "reports" / r / "eval.json").is_file()}
    mine = metrics.get(round_id, {})
    if "heldout" in mine:
        body = (f"## Per game\n\n{games_table([round_id], metrics)}\n\n"
                f"## Pooled over games\n\n{rounds_table(params, [round_id], metrics)}")
    elif "gap" in mine:
        body = logs_section(params, [round_id], metrics)
    else:
        body = "No eval.json for this round."
    return (f"# OEL round {round_id} (from {params.policy_of(round_id)})\n\n"
            f"MLflow run: [iteration {round_id}]({link})\n\n{body}\n")


def knowledge_rows(root: Path, round_id: str) -> list[dict[str, Any]]:
    from oel.artifacts import iter_jsonl
    from oel.paths import ProjectPaths
    from oel.schemas import KnowledgeItem

    items = ProjectPaths(root).round(round_id).items
    rows = []
    for item in iter_jsonl(items, KnowledgeItem) if items.is_file() else []:
        if len(rows) == MAX_ROWS:
            break
        rows.append({"game": item.game or "", "store": item.store, "step": item.step,
                     "source_episode": item.source_episode, "tokens": item.tokens,
                     "text": item.text[:MAX_TEXT_CHARS]})
    return rows


def publish_round(params: Params, root: Path, round_id: str) -> list[str]:
    """Create both artifacts in the running flow; returns their keys."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    link = mlflow_run_link(params, round_id)
    report_key, knowledge_key = artifact_key(params, "round-report"), artifact_key(params, "round-knowledge")
    create_markdown_artifact(report_markdown(params, root, round_id, link), key=report_key,
                             description=f"round {round_id}: report rows and its MLflow run")
    rows = knowledge_rows(root, round_id)
    create_table_artifact(rows, key=knowledge_key,
                          description=f"round {round_id}: {len(rows)} knowledge items (first {MAX_ROWS}, text cut "
                                      f"at {MAX_TEXT_CHARS} characters; data/{round_id}/knowledge/items.jsonl)")
    return [report_key, knowledge_key]

"""The lifecycle's decisions mirrored into MLflow's registries, on the tracking store params.tracking names.

Model Registry: `oel-policy`, one version per round. Its source is the round's policy folder (adapter or
weights + policy.json) logged on the round's iteration run; tags: round, parent, params hash, eval headline
and the gate's decision and reason. Aliases follow the decision files (oel.rounds.lifecycle.aliases): `champion` is the round the
next one starts from, `challenger` the latest round the gate kept back (`models:/oel-policy@champion`).

Prompt Registry: one prompt per game, `oel-knowledge-<game>`, a version per round holding that game's stores,
with an alias per round (`r2`) and `champion`, so the UI diffs how knowledge changed between rounds.

Re-running the gate for a round updates its version and prompt aliases instead of adding new ones; a forced
promotion or a rollback moves the aliases the same way. Called by the flow and the CLI after the decision file
is written; every MLflow call goes through oel.tracking.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from oel import tracking
from oel.config import Params
from oel.paths import ProjectPaths
from oel.rounds.lifecycle import aliases
from oel.rounds.records import Decision

log = logging.getLogger(__name__)

MODEL_NAME = "oel-policy"
PROMPT_PREFIX = "oel-knowledge-"
ROUND_TAG = "oel.round"


def params_hash(params: Params, round_id: str) -> str:
    """What shaped the round: every section but the other rounds' declarations (12 hex digits)."""
    dumped = params.model_dump(mode="json", by_alias=True)
    dumped["rounds"] = {r: v for r, v in dumped["rounds"].items() if r == round_id}
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:12]


def register_round(params: Params, root: Path, decision: Decision) -> dict[str, Any]:
    """Version + aliases in `oel-policy`, a prompt version per game, the decision on the iteration run."""
    record = decision.dump()
    round_id = record["round"]
    with tracking.client(params) as client:
        run_id = tracking.iteration_run_id(params, round_id)
        version = _model_version(client, params, root, run_id, record)
        prompts = _prompts(params, root, record)
        _sync_aliases(client, params, root, list(prompts))
        _log_decision(client, run_id, ProjectPaths(root).round(round_id).promotion, record)
    log.info("registry: %s version %s (%s); prompts %s", MODEL_NAME, version, record["decision"],
             ", ".join(f"{name} v{v}" for name, v in prompts.items()) or "none")
    return {"model": MODEL_NAME, "version": version, "alias": record["decision"], "prompts": prompts}


def _model_version(client, params: Params, root: Path, run_id: str, record: dict[str, Any]) -> str:
    round_id = record["round"]
    tracking.registered_model(client, MODEL_NAME, "OEL policies, one version per round; @champion is the one "
                              "the next round starts from and the one served")
    tags = {ROUND_TAG: round_id, "oel.parent": record["from"], "oel.params_hash": params_hash(params, round_id),
            "oel.eval.pass_rate": "none" if record["pass_rate"] is None else f"{record['pass_rate']:.4f}",
            "oel.gate.decision": record["decision"],
            "oel.gate.reason": record["reason"][:5000]}
    tags["oel.gate.blocked_by"] = ", ".join(record["blocked_by"])[:5000] or "none"
    tags.update({f"oel.eval.pass_rate.{c['game']}": f"{c['candidate']:.4f}" for c in record["checks"]
                 if c["metric"] == "pass_rate"})
    existing = [v for v in client.search_model_versions(f"name='{MODEL_NAME}'") if v.tags.get(ROUND_TAG) == round_id]
    if existing:
        version = existing[0].version
        for key, value in tags.items():
            client.set_model_version_tag(MODEL_NAME, version, key, value)
        return str(version)
    if not client.list_artifacts(run_id, "policy"):  # normally the flow's `record` task logged it already
        tracking.log_dir(client, run_id, ProjectPaths(root).round(round_id).model, "policy")
    mv = client.create_model_version(MODEL_NAME, source=f"runs:/{run_id}/policy", run_id=run_id, tags=tags,
                                     description=record["reason"][:5000])
    return str(mv.version)


def _prompts(params: Params, root: Path, record: dict[str, Any]) -> dict[str, int]:
    """Each game's stores as one prompt version; aliases `<round>` and, when promoted, `champion`."""
    round_id, out = record["round"], {}
    for game, stores in ProjectPaths(root).round(round_id).store_files().items():
        name = f"{PROMPT_PREFIX}{game}"
        version = tracking.prompt_version(params, name, round_id)
        if version is None:
            text = "\n\n".join(f"<!-- {game} store {k} -->\n{path.read_text(encoding='utf-8')}" for k, path in stores)
            version = tracking.register_prompt(params, name, text, f"{round_id} (from {record['from']}): "
                                               f"{record['decision']}", {ROUND_TAG: round_id, "oel.game": game})
            tracking.set_prompt_alias(params, name, round_id, version)
        out[name] = version
    return out


def _sync_aliases(client, params: Params, root: Path, prompts: list[str]) -> None:
    """Point every alias where the decision files say: rerunning an old round's gate never moves `champion`
    away from the round the next one starts from; a rollback moves it back."""
    versions = {v.tags.get(ROUND_TAG): v.version for v in client.search_model_versions(f"name='{MODEL_NAME}'")}
    now = aliases(params, root)
    held = tracking.model_aliases(client, MODEL_NAME, ROUND_TAG)
    for round_id, alias in held.items():  # an alias whose round no longer holds it (a rollback) goes
        if now.get(round_id) != alias and alias in ("champion", "challenger") and alias not in now.values():
            client.delete_registered_model_alias(MODEL_NAME, alias)
    for round_id, alias in now.items():
        if round_id in versions:
            client.set_registered_model_alias(MODEL_NAME, alias, versions[round_id])
        for name in prompts if alias == "champion" else []:
            version = tracking.prompt_version(params, name, round_id)
            if version is None:  # the champion round has no stores of this game
                log.info("registry: %s has no version for %s; its @champion alias is unchanged", name, round_id)
            else:
                tracking.set_prompt_alias(params, name, alias, version)


def _log_decision(client, run_id: str, path: Path, record: dict[str, Any]) -> None:
    client.set_tag(run_id, "oel.gate.decision", record["decision"])
    client.set_tag(run_id, "oel.gate.blocked_by", ", ".join(record["blocked_by"])[:5000] or "none")
    client.set_tag(run_id, "oel.gate.reason", record["reason"][:5000])
    client.set_tag(run_id, "oel.gate.champion", record["champion_after"])
    client.log_metric(run_id, "gate_promoted", float(record["decision"] == "champion"))
    if path.is_file():
        client.log_artifact(run_id, str(path), artifact_path="summaries")


def aliases_in_registry(params: Params) -> dict[str, str]:
    """round -> alias as the Model Registry holds them now (what `oel rounds --registry` checks)."""
    with tracking.client(params) as client:
        return tracking.model_aliases(client, MODEL_NAME, ROUND_TAG)

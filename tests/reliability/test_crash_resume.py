"""SIGKILL each stage of a real `oel` process at a seeded random point (distill: mid-checkpoint-write and
mid-step), then rerun it: no half-written artifact is ever visible under a name a later stage reads, the
rerun completes the round, distill resumes from its last COMPLETE checkpoint without redoing finished steps,
and deterministic stages end byte-equal to the uninterrupted reference run.

Collect and extract are deliberately not incremental: they are deterministic given the seeds (proven here by
byte equality), cheap next to distill, and write their outputs atomically at the end, so a rerun from
scratch is both correct and the simplest recovery.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oel.artifacts import read_json, read_jsonl
from oel.distill.checkpoints import COMPLETE
from oel.schemas import Episode, KnowledgeItem, PolicyManifest
from tests.reliability.conftest import (
    Reference,
    kill_midway,
    kill_stage,
    ok,
    rng,
    stage,
)

R1 = Path("data/r1")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp") if p.is_file()]


def valid_or_absent(path: Path, model) -> bool:
    """An output a later stage reads is either absent or whole and schema-valid (never half a file)."""
    if not path.exists():
        return False
    if path.suffix == ".jsonl":
        read_jsonl(path, model)  # every row whole and valid (an empty file is a valid "no items" result)
    else:
        read_json(path, model)
    return True


def same_bytes(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes(), f"{a} differs from the uninterrupted run's {b}"


def test_killed_collect_reruns_to_byte_identical_trajectories(reference: Reference, tmp_path):
    root = reference.seed_project(tmp_path / "p", "collect")
    kill_midway(root, "collect", reference, reset=lambda: (root / R1 / "trajectories.jsonl").unlink())
    valid_or_absent(root / R1 / "trajectories.jsonl", Episode)

    ok(stage(root, "collect"))
    same_bytes(root / R1 / "trajectories.jsonl", reference.root / R1 / "trajectories.jsonl")
    # A temp file a kill left behind is never read: later stages read only the final names.
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in temp_files(root))


def test_killed_extract_reruns_to_byte_identical_items(reference: Reference, tmp_path):
    root = reference.seed_project(tmp_path / "p", "extract")
    kill_midway(root, "extract", reference, reset=lambda: shutil.rmtree(root / R1 / "knowledge"))
    valid_or_absent(root / R1 / "knowledge" / "items.jsonl", KnowledgeItem)

    ok(stage(root, "extract"))
    for rel in ("knowledge/items.jsonl", "knowledge/extract_summary.json"):
        same_bytes(root / R1 / rel, reference.root / R1 / rel)
    # consolidate is cheap and deterministic: the rerun round continues to the same distill set and stores.
    ok(stage(root, "consolidate"))
    same_bytes(root / R1 / "distill.jsonl", reference.root / R1 / "distill.jsonl")
    stores = reference.root / R1 / "knowledge" / "stores"
    files = sorted(stores.rglob("store-*.md"))  # stores/<game>/store-<k>.md: knowledge is per game
    assert files
    for store in files:
        same_bytes(root / R1 / "knowledge" / "stores" / store.relative_to(stores), store)


def checkpoint_without_marker(folder: Path, min_step: int):
    """Trigger: a checkpoint-N folder (N >= min_step) exists but has no COMPLETE marker yet (mid-save)."""
    def check() -> str | None:
        if not folder.is_dir():
            return None
        for path in folder.glob("checkpoint-*"):
            step = int(path.name.split("-")[1])
            if step >= min_step and not (path / COMPLETE).exists():
                return path.name
        return None
    return check


def marker_appears(folder: Path, step: int):
    def check() -> str | None:
        return f"checkpoint-{step} complete" if (folder / f"checkpoint-{step}" / COMPLETE).exists() else None
    return check


def steps_logged(stderr: str) -> list[int]:
    return [int(m) for m in re.findall(r"distill step (\d+)/", stderr)]


def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "models" / "r1" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_killed_distill_resumes_from_its_last_complete_checkpoint(reference: Reference, tmp_path):
    root = reference.seed_project(tmp_path / "p", "distill")
    ckpts = root / "checkpoints" / "r1"
    model = root / "models" / "r1"

    # Kill 1: while checkpoint-N (N >= 2) is being written: its folder exists, its marker does not.
    first = kill_stage(root, "distill", when=checkpoint_without_marker(ckpts, 2), poll_s=0.002)
    assert first.returncode == -9, f"distill finished before the kill:\n{first.stderr[-2000:]}"
    half = int(first.trigger.split("-")[1])
    assert not valid_or_absent(model / "policy.json", PolicyManifest)  # no policy until training is done

    # Kill 2: the rerun resumes from checkpoint-(N-1), then dies mid-step at a seeded moment after the next
    # checkpoint lands (between checkpoints, or inside the following save).
    delay = rng("distill-step").uniform(0.0, 0.15)
    second = kill_stage(root, "distill", when=_after(marker_appears(ckpts, half), delay), poll_s=0.002)
    assert re.search(rf"resuming distillation from \S*checkpoints/r1/checkpoint-{half - 1}\b", second.stderr), \
        second.stderr[-2000:]
    assert min(steps_logged(second.stderr), default=half) >= half  # steps 1..N-1 are not redone
    # If the kill came only after training ended, the policy it wrote is whole (policy.json is written last).
    valid_or_absent(model / "policy.json", PolicyManifest)

    # Final rerun: resumes from the newest complete checkpoint and finishes the round.
    complete = sorted(int(p.parent.name.split("-")[1]) for p in ckpts.glob(f"checkpoint-*/{COMPLETE}"))
    last = ok(stage(root, "distill"))
    summary = read_json(model / "train_summary.json")
    if complete[-1] < 4:
        assert summary["resumed_from"].endswith(f"checkpoint-{complete[-1]}"), summary["resumed_from"]
        assert steps_logged(last.stderr) == list(range(complete[-1] + 1, 5)), last.stderr[-2000:]
    assert summary["steps_run"] == 4 and [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
    assert "removing incomplete checkpoint" in second.stderr + last.stderr  # the half-written one was dropped
    read_json(model / "policy.json", PolicyManifest)

    ref, got = adapter(reference.root), adapter(root)
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-4, msg=key)
    ref_hist = read_json(reference.root / "models" / "r1" / "train_summary.json")["history"]
    for a, b in zip(summary["history"], ref_hist, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)


def _after(check, delay: float):
    import time

    seen: list[tuple[float, str]] = []

    def wrapped() -> str | None:
        if not seen:
            if (reason := check()) is None:
                return None
            seen.append((time.monotonic(), reason))
        return f"{delay:.2f}s after {seen[0][1]}" if time.monotonic() - seen[0][0] >= delay else None
    return wrapped


def test_killed_eval_never_marks_the_round_done_and_rerun_matches(reference: Reference, tmp_path):
    root = reference.seed_project(tmp_path / "p", "eval")
    details = root / "reports" / "r1" / "eval.json"
    kill_midway(root, "eval", reference, reset=lambda: (shutil.rmtree(root / R1 / "eval", ignore_errors=True),
                                                          shutil.rmtree(root / "reports", ignore_errors=True),
                                                          shutil.rmtree(root / "metrics", ignore_errors=True)))
    from oel.rounds import is_done

    if is_done(root, "r1"):  # eval.json is written last: if it is there, everything before it is whole
        json.loads(details.read_text())
        valid_or_absent(root / R1 / "eval" / "episodes.jsonl", Episode)

    ok(stage(root, "eval"))
    assert is_done(root, "r1")
    same_bytes(root / R1 / "eval" / "episodes.jsonl", reference.root / R1 / "eval" / "episodes.jsonl")
    assert json.loads(details.read_text())["heldout"] == \
        json.loads((reference.root / "reports" / "r1" / "eval.json").read_text())["heldout"]

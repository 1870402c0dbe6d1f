"""Corrupt state on disk (issue 20), the rebuildable part: distill checkpoints and the TextWorld game cache.

Both hold only work that can be redone (training steps since the round started, games generated from their
seed), so damage is not an error: the project drops or regenerates what is damaged, says so in one log line,
and the result equals the undamaged run's. Checkpoints come from one real tiny distill run (module fixture);
the damage matrix runs the resume decision (`checkpoints.prepare`) on copies, and one case trains through it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oel.artifacts import read_json
from oel.distill import checkpoints
from oel.stages import distill as stage
from tests.conftest import MODEL_CACHE, tiny_params
from tests.integration.test_distill_stage import make_rows, setup_round
from tests.reliability.conftest import rng

JUNK = b"\x89\xff\xfe\x00" + rng("corrupt-caches").randbytes(300)
PARAMS = {"distill": {"steps": 4, "save_every": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A project after one uninterrupted 4-step distill: checkpoint-2 and checkpoint-4 complete."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / ".cache").mkdir()
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (root / ".cache" / "models").symlink_to(MODEL_CACHE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        stage.run(tiny_params(**PARAMS), setup_round(root, make_rows(3)))
    return root


def ckpt_dir(root: Path) -> Path:
    from oel.paths import ProjectPaths

    return ProjectPaths(root).round("r1").checkpoints


def cut(path: Path) -> bytes:
    return path.read_bytes()[: max(1, path.stat().st_size // 2)]


# (file inside checkpoint-4, how it is damaged) -> the reason the log line gives
DAMAGE = {
    "trainer_state.json empty": ("trainer_state.json", lambda p: b"", "trainer_state.json is not valid JSON"),
    "trainer_state.json random bytes": ("trainer_state.json", lambda p: JUNK, "trainer_state.json is not valid JSON"),
    "trainer_state.json a list": ("trainer_state.json", lambda p: b"[1, 2]", "trainer_state.json is not a JSON object"),
    "trainer_state.json missing": ("trainer_state.json", None, "trainer_state.json is missing"),
    "adapter weights cut short": ("adapter_model.safetensors", cut, "adapter_model.safetensors is cut short"),
    "adapter weights random bytes": ("adapter_model.safetensors", lambda p: JUNK, "adapter_model.safetensors"),
    "optimizer cut short": ("optimizer.pt", cut, "optimizer.pt is cut short or not a torch file"),
    "rng state random bytes": ("rng_state.pth", lambda p: JUNK, "rng_state.pth is cut short or not a torch file"),
    "adapter config a list": ("adapter_config.json", lambda p: b"[]", "adapter_config.json is not a JSON object"),
}


def damaged_copy(trained: Path, tmp_path: Path, target: str, how) -> Path:
    folder = tmp_path / "checkpoints"
    shutil.copytree(ckpt_dir(trained), folder)
    path = folder / "checkpoint-4" / target
    assert path.is_file(), f"a real checkpoint holds {target}: {sorted(p.name for p in path.parent.iterdir())}"
    if how is None:
        path.unlink()
    else:
        path.write_bytes(how(path))
    return folder


def test_the_real_checkpoints_are_intact(trained):
    found = [p.name for _, p in checkpoints.checkpoints(ckpt_dir(trained))]
    assert found == ["checkpoint-2", "checkpoint-4"]
    assert all(checkpoints.damage(p) is None for _, p in checkpoints.checkpoints(ckpt_dir(trained)))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_dropped_with_one_log_line(trained, tmp_path, caplog, case):
    target, how, reason = DAMAGE[case]
    folder = damaged_copy(trained, tmp_path, target, how)
    fingerprint = read_json(folder / checkpoints.FINGERPRINT)
    with caplog.at_level(logging.WARNING, logger="oel.distill.checkpoints"):
        resume = checkpoints.prepare(folder, fingerprint)
    assert resume == folder / "checkpoint-2"
    assert not (folder / "checkpoint-4").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "checkpoint-4 is damaged" in lines[0] and reason in lines[0], lines


def test_every_checkpoint_damaged_starts_over(trained, tmp_path, caplog):
    folder = damaged_copy(trained, tmp_path, "trainer_state.json", lambda p: b"")
    (folder / "checkpoint-2" / "trainer_state.json").write_bytes(JUNK)
    with caplog.at_level(logging.WARNING, logger="oel.distill.checkpoints"):
        assert checkpoints.prepare(folder, read_json(folder / checkpoints.FINGERPRINT)) is None
    assert len(caplog.records) == 2 and checkpoints.checkpoints(folder) == []


@pytest.mark.parametrize("content", [b"", JUNK, b"[1]"], ids=["empty", "random bytes", "a list"])
def test_damaged_fingerprint_starts_over_with_one_log_line(trained, tmp_path, caplog, content):
    folder = tmp_path / "checkpoints"
    shutil.copytree(ckpt_dir(trained), folder)
    fingerprint = read_json(folder / checkpoints.FINGERPRINT)
    (folder / checkpoints.FINGERPRINT).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="oel.distill.checkpoints"):
        assert checkpoints.prepare(folder, fingerprint) is None
    assert len(caplog.records) == 1 and "starting over" in caplog.records[0].getMessage()
    assert read_json(folder / checkpoints.FINGERPRINT) == json.loads(json.dumps(fingerprint))


def test_distill_resumes_past_a_damaged_checkpoint_to_the_undamaged_result(trained, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(trained, root, symlinks=True)
    paths = setup_round(root, make_rows(3))
    uninterrupted = load_file(str(paths.model / "adapter" / "adapter_model.safetensors"))
    shutil.rmtree(paths.model)  # as if the run had been killed after checkpoint-4, before the policy
    state = paths.checkpoints / "checkpoint-4" / "trainer_state.json"
    state.write_bytes(cut(state))
    monkeypatch.chdir(root)
    summary = stage.run(tiny_params(**PARAMS), paths)
    assert summary["resumed_from"].endswith("checkpoint-2")
    resumed = load_file(str(paths.model / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6), key

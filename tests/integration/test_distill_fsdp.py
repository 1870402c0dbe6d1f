"""distill's multi-process placement and its final save under FSDP2, on CPU.

- Each rank loads onto its own GPU (the stage makes cuda:<local rank> current before loading) and trains there:
  distill() moves the loaded model to the rank's device (TrainingArguments.device) before the frozen teacher
  is copied from it.
- FSDP2's final save: every rank takes part in gathering the full state dict, and rank 0 writes whole weights
  (two processes on gloo, the tiny model sharded per decoder layer as accelerate's FSDP2 does).
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from oel.distill import trainer
from tests.conftest import tiny_params

REPO = Path(__file__).resolve().parents[2]


class Stop(Exception):
    pass


def test_the_model_moves_to_the_rank_device_before_the_teacher_copy(tiny_model, tmp_path, monkeypatch):
    from oel.distill.trainer import _trl

    SDFTConfig, _ = _trl()
    # As on rank 1 of a launch: the arguments pick the rank's device, the loaded model sits elsewhere. "meta" stands
    # in for cuda:1, which a CPU machine lacks; moving there keeps shapes, not values, which is all this needs.
    real = SDFTConfig.device.fget  # still run: it sets up the process state that world_size reads
    monkeypatch.setattr(SDFTConfig, "device", property(lambda self: (real(self), torch.device("meta"))[1]))
    seen = {}

    def build(model, *args, **kwargs):
        seen["device"] = next(model.parameters()).device
        raise Stop

    monkeypatch.setattr(trainer, "build_trainer", build)
    dp = tiny_params().distill
    model = copy.deepcopy(tiny_model.model)
    records = [{}] * trainer.samples_needed(dp, 4)
    with pytest.raises(Stop):
        trainer.distill(model, tiny_model.tokenizer, records, dp, tmp_path / "ckpt", {"f": 1})
    assert seen["device"] == torch.device("meta")


def test_each_rank_loads_onto_its_own_gpu(monkeypatch, tmp_path):
    """The stage's load targets the current CUDA device: a launched rank makes GPU LOCAL_RANK current first."""
    import oel.models
    from oel.paths import ProjectPaths
    from oel.stages import _common

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(oel.models, "load_model", lambda *args: calls.append(("load", args[0])))
    paths = ProjectPaths(tmp_path).round("base")
    monkeypatch.setenv("LOCAL_RANK", "1")
    _common.load_round_policy(tiny_params(), paths)
    monkeypatch.delenv("LOCAL_RANK")
    _common.load_round_policy(tiny_params(), paths)  # a plain run leaves the device alone
    assert calls == [("set_device", 1), ("load", "tiny-random"), ("load", "tiny-random")]


def test_a_model_already_on_the_device_is_not_copied(tiny_model):
    assert trainer.on_rank_device(tiny_model.model, "cpu") is tiny_model.model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for layer in trainer.decoder_layers(model):  # one unit per decoder layer, then the root (accelerate's FSDP2)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any(type(p).__name__ == "DTensor" for p in model.parameters())
    state = trainer.full_state_dict(model)  # every rank
    if rank == 0:
        fake = types.SimpleNamespace(model=model, accelerator=types.SimpleNamespace(unwrap_model=lambda m: m),
                                     is_world_process_zero=lambda: True)
        written = trainer.save_weights(trainer.TrainResult(fake, None, state), AutoTokenizer.from_pretrained(model_dir),
                                       Path(out), "full", merge=True)
        assert written == ["merged"]
    else:
        assert state == {}
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_final_save_writes_whole_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    mp.spawn(_fsdp2_rank, args=(2, free_port(), str(tiny_model_dir), str(tmp_path / "out")), nprocs=2)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)

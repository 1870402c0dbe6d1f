"""model.dtype: auto on a CPU picks the measured faster dtype, once per CPU and torch version."""

from __future__ import annotations

import json

import pytest
import torch

from oel.models import cpu_dtype
from oel.models.loading import _torch_dtype


@pytest.fixture
def timed(monkeypatch):
    """measure() replaced by given times; counts its calls."""
    calls = []

    def use(fp32: float, bf16: float):
        monkeypatch.setattr(cpu_dtype, "measure", lambda: calls.append(1) or {"float32": fp32, "bfloat16": bf16})
        return calls
    return use


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(4.0, 1.0, "bfloat16"), (1.0, 4.0, "float32"),
                                                       (1.1, 1.0, "float32"), (1.2, 1.0, "bfloat16")])
def test_the_faster_dtype_wins_by_a_clear_margin(timed, tmp_path, fp32, bf16, expected):
    timed(fp32, bf16)
    assert cpu_dtype.fastest(tmp_path) == expected
    kept = json.loads((tmp_path / cpu_dtype.CACHE_FILE).read_text())
    assert kept["dtype"] == expected and kept["key"] == cpu_dtype.cpu_key()


def test_the_choice_is_measured_once_and_reused(timed, tmp_path):
    calls = timed(4.0, 1.0)
    assert [cpu_dtype.fastest(tmp_path) for _ in range(3)] == ["bfloat16"] * 3
    assert len(calls) == 1


@pytest.mark.parametrize("damage", [b"", b"\xff\xfe", b"[1, 2]", b'{"key": "other-cpu", "dtype": "bfloat16"}',
                                    b'{"key": "KEY", "dtype": "int8"}'])
def test_a_damaged_or_foreign_cache_is_measured_again(timed, tmp_path, damage):
    (tmp_path / cpu_dtype.CACHE_FILE).write_bytes(damage.replace(b"KEY", cpu_dtype.cpu_key().encode()))
    calls = timed(1.0, 4.0)
    assert cpu_dtype.fastest(tmp_path) == "float32" and len(calls) == 1


def test_a_real_measurement_times_both_dtypes():
    times = cpu_dtype.measure(reps=1)
    assert set(times) == {"float32", "bfloat16"} and all(0 < t < 10 for t in times.values())


def test_auto_is_measured_on_cpu_only(timed, tmp_path):
    timed(4.0, 1.0)
    assert _torch_dtype("auto", "cpu", tmp_path) is torch.bfloat16
    assert _torch_dtype("auto", "cuda", tmp_path) == "auto"  # a GPU takes the checkpoint's own dtype
    assert _torch_dtype("float32", "cpu", tmp_path) is torch.float32


def test_trained_policies_load_in_float32_under_auto(timed, project):
    """A round's LoRA delta is ~1e-4 of the weights: merged into bf16 it would round away, so under `auto` the
    base model runs in the measured bf16 and every trained policy (adapter or merged) in float32."""
    from peft import LoraConfig, get_peft_model

    from oel.config import ModelParams
    from oel.models import load_model, load_policy
    from oel.models.loading import write_policy
    from oel.schemas import PolicyManifest

    timed(4.0, 1.0)
    auto = ModelParams(name="tiny-random", dtype="auto", device="cpu")
    models = project / "models"
    write_policy(models / "base", PolicyManifest(model="tiny-random"))
    student = get_peft_model(load_model("tiny-random").model, LoraConfig(r=2, target_modules=["q_proj"]))
    student.save_pretrained(models / "r1" / "adapter")
    write_policy(models / "r1", PolicyManifest(parent="../base", adapter="adapter"))
    assert load_policy(models / "base", auto, project).model.dtype == torch.bfloat16
    assert load_policy(models / "r1", auto, project).model.dtype == torch.float32
    assert load_model(str(models / "r1" / "adapter"), auto, project).model.dtype == torch.float32
    gpu_like = ModelParams(name="tiny-random", dtype="bfloat16", device="cpu")  # an explicit dtype is kept
    assert load_policy(models / "r1", gpu_like, project).model.dtype == torch.bfloat16


def test_distill_autocasts_in_bf16_where_this_machine_computes_in_bf16(timed, project):
    """distill.bf16 auto follows the compute dtype, not only the weights: a later round's fp32 trained weights
    on a CPU that measured bf16 faster still train under bf16 autocast, as the first round did."""
    from oel.config import DistillParams, ModelParams
    from oel.distill.trainer import resolve_bf16
    from oel.models import compute_dtype, load_model

    model = load_model("tiny-random").model  # float32
    auto = ModelParams(name="tiny-random", dtype="auto", device="cpu")
    timed(4.0, 1.0)
    assert resolve_bf16(DistillParams(), model, compute_dtype(auto, project)).bf16 is True
    fp32 = auto.model_copy(update={"dtype": "float32"})
    assert resolve_bf16(DistillParams(), model, compute_dtype(fp32, project)).bf16 is False
    assert resolve_bf16(DistillParams(bf16=False), model, torch.bfloat16).bf16 is False  # an explicit value is kept
    assert resolve_bf16(DistillParams(), model.to(torch.bfloat16)).bf16 is True

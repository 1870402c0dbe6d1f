"""The one generation setting: every stage builds its backend through build_backend, `vllm` is refused in
one line where it cannot run, and (with a stand-in vllm module) the factory serves a merged folder with the
engine arguments the section names. distill's TRL vLLM arguments come from the same section."""

from __future__ import annotations

import ast
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

from oel.config import parse_params
from oel.errors import UserError
from oel.generation import BackendError, check_backend, distill_sampling_args, vllm_engine_args
from tests.conftest import tiny_params

SRC = Path(__file__).resolve().parents[2] / "src" / "oel"
BACKENDS = {"TransformersBackend", "VLLMBackend"}


def constructions(path: Path) -> list[str]:
    """Calls of a backend class in a source file (by name or attribute)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
            if name in BACKENDS:
                found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    return found


def test_no_module_but_the_factory_constructs_a_backend():
    calls = [c for path in sorted(SRC.rglob("*.py")) for c in constructions(path)]
    assert calls and all(c.startswith("oel/rollout/factory.py:") for c in calls), calls


def test_the_scan_sees_a_construction(tmp_path):
    # The check above is only as good as the scan: a direct construction in a stage must be found.
    stage = SRC / "stages" / "_probe_example.py"
    try:
        stage.write_text("from oel.rollout import TransformersBackend\nb = TransformersBackend(None)\n")
        assert constructions(stage) == ["oel/stages/_probe_example.py:2"]
    finally:
        stage.unlink()


def fake_vllm(monkeypatch, cuda: bool = True) -> dict:
    """A stand-in vllm module (LLM + SamplingParams) in sys.modules; records what the factory asks of it."""
    seen: dict = {"llm": []}

    class LLM:
        def __init__(self, model, seed=0, **engine):
            from transformers import AutoTokenizer

            seen["llm"].append({"model": model, "seed": seed, **engine})
            self.tokenizer = AutoTokenizer.from_pretrained(model)

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, inputs, params, use_tqdm=False):
            seen.setdefault("params", []).append(params)
            out = types.SimpleNamespace(text="I think the best move is [up]", token_ids=[1, 2, 3])
            return [types.SimpleNamespace(outputs=[out]) for _ in inputs]

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = LLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    import oel.generation

    monkeypatch.setattr(oel.generation, "_cuda_visible", lambda: cuda)  # torch itself stays CPU-only
    return seen


def vllm_params(**overrides):
    return tiny_params(generation={"backend": "vllm", "gpu_memory_utilization": 0.5, "max_model_len": 4096,
                                   **overrides})


def test_default_is_transformers_and_profiles_pick_vllm():
    from oel.config import profiles

    assert tiny_params().generation.backend == "transformers"
    assert parse_params({}).generation.backend == "transformers"
    gpu_like = [name for name in profiles() if name != "cpu"]
    assert gpu_like and all(parse_params({"profile": name}).generation.backend == "vllm" for name in gpu_like)


def test_vllm_without_the_package_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError) as err:
        check_backend(vllm_params().generation)
    # The install line that resolves (the GPU lock), not the `gpu` extra, which cannot (docs/gpu.md).
    assert "pip install -r requirements-gpu-py311.lock" in str(err.value) and "\n" not in str(err.value)
    check_backend(tiny_params().generation)  # transformers: nothing to check


def test_vllm_without_cuda_is_one_line(monkeypatch):
    fake_vllm(monkeypatch, cuda=False)
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        check_backend(vllm_params().generation)


def test_validate_refuses_vllm_where_it_cannot_run(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from oel.cli import app

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    file = tmp_path / "params.yaml"
    file.write_text("profile: gpu\n")
    result = CliRunner().invoke(app, ["validate", "--params", str(file)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: generation.backend: vllm needs the vllm package, which is not installed: install the GPU lock on "
        "a CUDA machine (docs/gpu.md: pip install -r requirements-gpu-py311.lock), or set generation.backend: "
        "transformers"]


def test_factory_serves_vllm_with_the_sections_engine_args(monkeypatch, project, tiny_model_dir):
    from oel.config import SamplingParams
    from oel.rollout import VLLMBackend, build_backend
    from oel.schemas import Message

    seen = fake_vllm(monkeypatch)
    params = vllm_params()
    backend = build_backend(params, str(tiny_model_dir), project)
    assert isinstance(backend, VLLMBackend)
    (engine,) = seen["llm"]
    assert engine == {"model": str(tiny_model_dir), "seed": params.seed, "gpu_memory_utilization": 0.5,
                      "tensor_parallel_size": 1, "max_model_len": 4096, "dtype": "float32",
                      "trust_remote_code": False}
    gens = backend.generate([[Message(role="user", content="hi")]] * 2, SamplingParams(max_new_tokens=5), seed=7)
    assert [g.n_tokens for g in gens] == [3, 3]
    assert [p.seed for p in seen["params"][0]] == [7, 8] and seen["params"][0][0].max_tokens == 5


def test_factory_merges_an_adapter_policy_before_vllm_loads_it(monkeypatch, project, tiny_model_dir):
    from oel.rollout import build_backend
    from tests.integration.test_merge import adapter_policy

    policy = adapter_policy(project, tiny_model_dir)
    seen = fake_vllm(monkeypatch)
    build_backend(vllm_params(), str(policy), project)
    served = Path(seen["llm"][0]["model"])
    assert served.parent == project / ".cache" / "merged" and (served / "config.json").is_file()


def test_engine_dtype_follows_the_model_unless_set():
    assert vllm_engine_args(vllm_params())["dtype"] == "float32"
    assert vllm_engine_args(vllm_params(dtype="bfloat16"))["dtype"] == "bfloat16"
    assert "max_model_len" not in vllm_engine_args(vllm_params(max_model_len=0))


def test_distill_samples_with_trls_colocated_vllm(monkeypatch, tmp_path):
    from oel.distill.trainer import _config

    fake_vllm(monkeypatch)
    args = distill_sampling_args(vllm_params(colocate_memory_utilization=0.25, tensor_parallel_size=2))
    assert args == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.25,
                    "vllm_tensor_parallel_size": 2, "vllm_max_model_length": 4096}
    config = _config(tiny_params().distill, tmp_path, None, False, 1, args)
    assert (config.use_vllm, config.vllm_mode, config.vllm_gpu_memory_utilization) == (True, "colocate", 0.25)
    assert distill_sampling_args(tiny_params()) == {"use_vllm": False}
    assert _config(tiny_params().distill, tmp_path, None, False, 1).use_vllm is False
    # off_policy samples the frozen teacher, which TRL's engine (the student's weights) cannot serve.
    assert distill_sampling_args(vllm_params().model_copy(
        update={"distill": tiny_params().distill.model_copy(update={"mode": "off_policy"})})) == {"use_vllm": False}


def test_distill_stage_refuses_vllm_before_any_work(monkeypatch, tmp_path):
    from oel.paths import ProjectPaths
    from oel.stages import distill

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="generation.backend: vllm needs the vllm package"):
        distill.run(vllm_params(), ProjectPaths(tmp_path).round("r1"))  # no distill.jsonl: not read yet

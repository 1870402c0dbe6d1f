"""VLLMBackend against a stand-in vllm shaped like vLLM 0.30's own classes (tests/fixtures/gpu/vllm-0.30.0.json,
read from its wheel): the sampling keywords it sends are ones SamplingParams has, and close() shuts the v1 engine
down through the engine core client, then runs vLLM's own cleanup, before the next engine is built."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest

from oel.config import SamplingParams

FACTS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "gpu" / "vllm-0.30.0.json").read_text())


def strict_sampling_params(seen: list):
    """vllm.SamplingParams is a msgspec Struct: a keyword that is not one of its fields is a TypeError."""
    fields = set(FACTS["sampling_params_fields"])

    def make(**kwargs):
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"Unexpected keyword argument {unknown[0]!r}")
        seen.append(kwargs)
        return types.SimpleNamespace(**kwargs)

    return make


@pytest.fixture
def fake_vllm(monkeypatch, tiny_model_dir):
    """vllm, vllm.distributed and vllm.distributed.parallel_state stand-ins; `events` records the shutdown order."""
    events: list[str] = []
    sampling: list[dict] = []

    class EngineCoreClient:
        def shutdown(self, timeout=None):
            events.append("engine_core.shutdown")

    class LLMEngine:  # v1: no shutdown() of its own
        def __init__(self):
            self.engine_core = EngineCoreClient()

    class LLM:
        def __init__(self, model, seed=0, **engine):
            from transformers import AutoTokenizer

            self.llm_engine = LLMEngine()
            self.tokenizer = AutoTokenizer.from_pretrained(model)

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, inputs, params, use_tqdm=False):
            out = types.SimpleNamespace(text="[up]", token_ids=[1, 2])
            # prompt_logprobs as vLLM returns them: None for the first token, then {token id: Logprob}
            return [types.SimpleNamespace(outputs=[out], prompt_logprobs=[None] + [
                {tok: types.SimpleNamespace(logprob=-1.0)} for tok in row["prompt_token_ids"][1:]]) for row in inputs]

    def cleanup_dist_env_and_memory(shutdown_ray=False):
        events.append("cleanup_dist_env_and_memory")

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = LLM, strict_sampling_params(sampling)
    distributed = types.ModuleType("vllm.distributed")
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory
    vllm.distributed, distributed.parallel_state = distributed, parallel_state
    for name, module in (("vllm", vllm), ("vllm.distributed", distributed),
                         ("vllm.distributed.parallel_state", parallel_state)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(events=events, sampling=sampling, model=tiny_model_dir)


def test_the_stand_in_has_the_shape_of_vllm_0_30():
    # Why the old close() did nothing: it looked for LLMEngine.shutdown, which the v1 engine lacks.
    assert "shutdown" not in FACTS["v1_llm_engine_methods"] and "shutdown" not in FACTS["llm_methods"]
    assert "shutdown" in FACTS["v1_engine_core_client_methods"]
    assert "cleanup_dist_env_and_memory" in FACTS["distributed_parallel_state_functions"]
    assert "do_sample" not in FACTS["sampling_params_fields"]


def test_close_shuts_the_engine_core_down_then_frees_the_gpu(fake_vllm):
    from oel.rollout.vllm_backend import VLLMBackend

    backend = VLLMBackend(fake_vllm.model)
    backend.close()
    assert fake_vllm.events == ["engine_core.shutdown", "cleanup_dist_env_and_memory"]
    assert backend.llm is None


def test_sampling_keywords_are_vllm_fields(fake_vllm):
    from oel.rollout.vllm_backend import VLLMBackend
    from oel.schemas import Message

    backend = VLLMBackend(fake_vllm.model)
    prompt = [[Message(role="user", content="Which move?")]]
    backend.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=4), seed=3)
    backend.generate(prompt, SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=4))
    greedy, sampled = fake_vllm.sampling
    assert greedy == {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 4, "seed": 3}
    assert sampled == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_tokens": 4, "seed": None}
    total, tokens = backend.loglik(["a few words of prose"])
    assert tokens > 1 and total == -float(tokens)
    assert fake_vllm.sampling[-1] == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}

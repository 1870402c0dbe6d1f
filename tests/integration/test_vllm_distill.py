"""distill with TRL's colocated vLLM, on CPU: the real trainer and TRL's VLLMGeneration, with only the engine
stood in (its SamplingParams refuses any keyword vLLM 0.30's lacks, tests/fixtures/gpu/vllm-0.30.0.json).

Greedy sampling reaches vLLM as temperature 0, never as transformers' do_sample; and a LoRA student's weight
sync leaves the base weights, which with the adapter disabled are the frozen teacher, bit for bit as they were,
where TRL's own merge/unmerge in bf16 moves them."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from oel.distill.dataset import schedule, to_records
from oel.distill.trainer import _config, build_trainer
from tests.conftest import tiny_params
from tests.integration.test_distill_microbatch import rows
from tests.unit.test_vllm_backend import strict_sampling_params

VLLM_ARGS = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}


@pytest.fixture
def engine(monkeypatch):
    """TRL's VLLMGeneration with vllm.LLM replaced by a recorder: what it samples with, which weights it loads."""
    import trl.generation.vllm_generation as vg

    seen = types.SimpleNamespace(sampling=[], loaded=[])

    def init(self):
        out = types.SimpleNamespace(token_ids=[5, 6, 2], logprobs=None)
        model = types.SimpleNamespace(load_weights=lambda weights: seen.loaded.extend(weights))
        runner = types.SimpleNamespace(model=model)
        self.llm = types.SimpleNamespace(
            generate=lambda prompts, sampling_params, use_tqdm: [
                types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[out]) for p in prompts],
            reset_prefix_cache=lambda: None,
            llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner))))

    monkeypatch.setattr(vg.VLLMGeneration, "_init_vllm", init)
    monkeypatch.setattr(vg, "SamplingParams", strict_sampling_params(seen.sampling), raising=False)
    return seen


def trainer_for(tiny_model, tmp_path, model=None, **distill):
    params = tiny_params(distill={"batch_size": 2, **distill})
    data = rows()
    args = _config(params.distill, tmp_path / "ckpt", None, False, 1, VLLM_ARGS)
    return build_trainer(model if model is not None else copy.deepcopy(tiny_model.model), tiny_model.tokenizer,
                         to_records(data, schedule(len(data), 2, 0)), params.distill, tmp_path / "ckpt", args=args)


def test_greedy_sampling_reaches_vllm_as_temperature_zero(tiny_model, tmp_path, engine):
    trainer = trainer_for(tiny_model, tmp_path, sampling={"temperature": 0.0, "max_new_tokens": 4})
    prompt_ids, completion_ids, *_ = trainer.vllm_generation.generate([[1, 2, 3]], None, 1)
    assert completion_ids == [[5, 6, 2]]
    (kwargs,) = engine.sampling
    assert kwargs["temperature"] == 0.0 and kwargs["max_tokens"] == 4 and "do_sample" not in kwargs
    # What the greedy setting used to send: the stand-in refuses it as vLLM does.
    with pytest.raises(TypeError, match="do_sample"):
        strict_sampling_params([])(**{**kwargs, "do_sample": False})


def test_sampled_settings_pass_through(tiny_model, tmp_path, engine):
    trainer = trainer_for(tiny_model, tmp_path, sampling={"temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                                          "max_new_tokens": 4})
    trainer.vllm_generation.generate([[1, 2, 3]], None, 1)
    (kwargs,) = engine.sampling
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (0.7, 0.9, 20)


def lora_student(tiny_model, tmp_path):
    """A bf16 base (as the GPU profiles load it) with a trained-looking adapter: B is zero at init."""
    trainer = trainer_for(tiny_model, tmp_path, model=copy.deepcopy(tiny_model.model).to(torch.bfloat16))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return trainer


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_lora_sync_leaves_the_teacher_exact(tiny_model, tmp_path, engine):
    trainer = lora_student(tiny_model, tmp_path)
    before = base_weights(trainer.model)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad(), trainer.model.disable_adapter():
        teacher_before = trainer.model(input_ids=ids).logits
    for _ in range(5):
        trainer.vllm_generation.sync_weights()
    after = base_weights(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with torch.no_grad(), trainer.model.disable_adapter():
        assert torch.equal(trainer.model(input_ids=ids).logits, teacher_before)
    # vLLM got the merged student: PEFT's own merge of the same adapter, under vLLM's names.
    merged = copy.deepcopy(trainer.model).merge_and_unload().state_dict()
    pushed = dict(engine.loaded[: len(engine.loaded) // 5])
    assert set(pushed) <= set(merged) and any("q_proj" in n for n in pushed)
    assert all(torch.equal(pushed[n], merged[n]) for n in pushed)
    assert any(not torch.equal(pushed[n], before["base_model.model." + n.replace(".weight", ".base_layer.weight")])
               for n in pushed if "q_proj" in n)


def test_trls_own_sync_drifts_the_bf16_base(tiny_model, tmp_path, engine):
    # The defect the override removes: merge_adapter()/unmerge_adapter() round the bf16 base at every sync.
    from trl.generation.vllm_generation import VLLMGeneration

    trainer = lora_student(tiny_model, tmp_path)
    before = base_weights(trainer.model)
    for _ in range(5):
        list(VLLMGeneration._iter_named_params(trainer.vllm_generation))
    after = base_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)

"""Stacked adapters summed into one LoRA (oel.online.lora), as vLLM serves a round started from a trained round:
the sum on the base must compute what the chain merged adapter by adapter computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from oel.online import lora


def _random_lora(model, r: int, alpha: int, targets: list[str], seed: int, out: Path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    for name, param in peft.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: an adapter that changes nothing would prove nothing
            param.data = torch.randn(param.shape, generator=gen) * 0.05
    peft.save_pretrained(str(out))
    return peft.merge_and_unload()


def test_the_sum_of_stacked_adapters_on_the_base_is_the_merged_chain(tiny_model_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()  # noqa: E731
    r1 = _random_lora(load(), 4, 8, ["q_proj", "v_proj"], 1, tmp_path / "r1")
    chain = _random_lora(r1, 8, 4, ["q_proj", "o_proj", "up_proj"], 2, tmp_path / "r2")
    composed = lora.compose([tmp_path / "r2", tmp_path / "r1"], tmp_path / "sum", str(tiny_model_dir))

    config = json.loads((composed / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 12) and lora.rank([composed]) == 12
    assert config["target_modules"] == ["o_proj", "q_proj", "up_proj", "v_proj"]
    served = PeftModel.from_pretrained(load(), str(composed)).eval()
    ids = torch.tensor([[1, 250, 3000, 42, 7, 999]])
    with torch.no_grad():
        expected, got, base = chain(ids).logits, served(ids).logits, load()(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapters do change the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_adapter_that_is_not_plain_lora_is_one_line(tmp_path: Path):
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(lora.AdapterError, match="DoRA.*serve.engine: transformers"):
        lora.rank([tmp_path / "dora"])

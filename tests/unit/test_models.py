import pytest

from oel.models import ModelError, load_model, load_policy, write_policy
from oel.schemas import PolicyManifest


def test_tiny_model_has_chat_template(tiny_model):
    tok = tiny_model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in text and text.rstrip().endswith("assistant")
    assert sum(p.numel() for p in tiny_model.model.parameters()) < 5_000_000


def test_missing_model_folder_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "nope"))


def test_corrupt_model_folder_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"junk")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="could not be loaded"):
        load_model(str(tmp_path / "m"))


def test_policy_chain_with_adapter(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    write_policy(tmp_path / "base", PolicyManifest(model=str(tiny_model_dir)))
    base = load_policy(tmp_path / "base")
    peft = get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    (tmp_path / "r1").mkdir()
    peft.save_pretrained(tmp_path / "r1" / "adapter")
    write_policy(tmp_path / "r1", PolicyManifest(parent="../base", adapter="adapter", round="r1"))
    fresh_base = load_policy(tmp_path / "base").model
    r1 = load_policy(tmp_path / "r1")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert not torch.allclose(r1.model(ids).logits, fresh_base(ids).logits)
    # A policy folder is itself a model spec.
    assert load_model(str(tmp_path / "r1")).tokenizer is not None


def test_policy_without_manifest_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="policy.json"):
        load_policy(tmp_path)


def test_the_lm_head_gets_a_contiguous_input_and_the_same_logits(tiny_model):
    """transformers slices the hidden states for logits_to_keep; a non-contiguous view sends a CPU matmul down a
    path that copies the vocabulary projection once per row (models.loading.contiguous_head_input)."""
    import torch

    model = tiny_model.model
    head = model.get_output_embeddings()
    seen = []
    spy = head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    try:
        with torch.no_grad():
            kept = model(input_ids=ids, logits_to_keep=3).logits
            full = model(input_ids=ids).logits
    finally:
        spy.remove()
    assert seen == [True, True]  # the sliced [2, 3, hidden] view reached the head as a contiguous tensor
    assert torch.allclose(kept, full[:, -3:], atol=1e-5)
    hooks = list(head._forward_pre_hooks.values())
    assert hooks, "load_model registers the pre-hook"
    for hook in hooks:  # without it, the head really would have been handed a non-contiguous view
        sliced = torch.zeros(2, 6, 4)[:, -3:]
        assert not sliced.is_contiguous() and hook(head, (sliced,))[0].is_contiguous()

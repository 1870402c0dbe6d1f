"""vLLM loads full weights: an adapter policy is merged once into .cache/merged/<fingerprint>/ (atomic,
reused, rebuilt when the adapter changes), and the merged folder computes what the adapter policy does."""

from __future__ import annotations

from pathlib import Path

import pytest

from oel.config import ModelParams
from oel.models import load_model, load_policy, write_policy
from oel.models.merge import MARKER, servable_folder
from oel.schemas import PolicyManifest


def adapter_policy(root: Path, base_dir: Path, seed: int = 0) -> Path:
    """models/base -> base_dir, models/r1 = base + a random (non-zero) LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    models = root / "models"
    write_policy(models / "base", PolicyManifest(model=str(base_dir)))
    torch.manual_seed(seed)
    peft = get_peft_model(load_policy(models / "base").model,
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    (models / "r1").mkdir(parents=True, exist_ok=True)
    peft.save_pretrained(models / "r1" / "adapter")
    write_policy(models / "r1", PolicyManifest(parent="../base", adapter="adapter", round="r1"))
    return models / "r1"


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_merged_folder_equals_the_adapter_policy(project, tiny_model_dir):
    import torch

    policy = adapter_policy(project, tiny_model_dir)
    cfg = ModelParams()
    folder = Path(servable_folder(str(policy), cfg, project))
    assert folder.parent == project / ".cache" / "merged" and (folder / MARKER).is_file()
    ids = [1, 20, 300, 4000]
    unmerged = load_policy(policy, cfg, project, merge=False).model   # the PEFT model, adapter applied live
    merged = load_model(str(folder), cfg, project)
    torch.testing.assert_close(logits(merged.model, ids), logits(unmerged, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(merged.model, ids), logits(load_model(str(tiny_model_dir)).model, ids))
    assert merged.tokenizer("hello")["input_ids"] == load_model(str(tiny_model_dir)).tokenizer("hello")["input_ids"]
    # No temp folder is left behind.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_merge_is_reused_and_rebuilt_when_the_adapter_changes(project, tiny_model_dir, monkeypatch):
    import oel.models.merge as merge

    policy = adapter_policy(project, tiny_model_dir)
    first = servable_folder(str(policy), ModelParams(), project)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("merged again although nothing changed")

    monkeypatch.setattr(merge, "_write_merged", no_rebuild)
    assert servable_folder(str(policy), ModelParams(), project) == first
    monkeypatch.undo()
    adapter_policy(project, tiny_model_dir, seed=1)  # a retrained round: new adapter weights
    second = servable_folder(str(policy), ModelParams(), project)
    assert second != first and Path(second, MARKER).is_file()
    assert servable_folder(str(policy), ModelParams(dtype="bfloat16"), project) not in (first, second)


def test_a_merge_killed_midway_leaves_nothing_a_rerun_trusts(project, tiny_model_dir, monkeypatch):
    import oel.models.merge as merge

    policy = adapter_policy(project, tiny_model_dir)
    real = merge._write_merged

    def killed(target, cfg, root, out, key):
        real(target, cfg, root, out, key)
        (out / MARKER).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_write_merged", killed)
    with pytest.raises(KeyboardInterrupt):
        servable_folder(str(policy), ModelParams(), project)
    assert list((project / ".cache" / "merged").iterdir()) == []
    monkeypatch.undo()
    assert Path(servable_folder(str(policy), ModelParams(), project), MARKER).is_file()


def test_full_weights_and_plain_models_are_served_as_they_are(project, tiny_model_dir):
    write_policy(project / "models" / "base", PolicyManifest(model=str(tiny_model_dir)))
    assert servable_folder(str(project / "models" / "base"), ModelParams(), project) == str(tiny_model_dir)
    assert servable_folder("Qwen/Qwen3-1.7B", ModelParams(), project) == "Qwen/Qwen3-1.7B"  # a hub id
    assert not (project / ".cache" / "merged").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_broken_adapter_config_is_one_line_naming_the_file(tmp_path: Path, text: str):
    from oel.artifacts import ArtifactError
    from oel.models.merge import fingerprint

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(text)
    with pytest.raises(ArtifactError, match=r"adapter_config\.json(:1)?: (invalid JSON|expected a JSON object)"):
        fingerprint(tmp_path / "adapter", ModelParams())

"""A policy's stacked LoRA adapters as one adapter on its base model, for an engine that applies one (vLLM).

A round that started from a trained round is base + dW1 + dW2: each adapter was trained on the weights with the
ones before it merged, and merging is additive on the linear layers LoRA targets. With dW_i = s_i B_i A_i and
s_i = alpha_i / r_i, the sum is one LoRA of rank sum(r_i): A = [A_1; A_2; ...] (rows), B = [s_1 B_1, s_2 B_2, ...]
(columns), alpha = rank (scale 1). Exact up to float rounding; a module that only some adapters target gets zero
blocks in the others. Adapters with DoRA, rsLoRA, per-module ranks or saved full modules are refused (one line):
their sum is not of this form.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from oel.errors import UserError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
A, B = ".lora_A.weight", ".lora_B.weight"


class AdapterError(UserError, ValueError):
    """Adapters that cannot be summed into one; one line naming the folder and the setting."""


def rank(adapters: list[Path]) -> int:
    """The rank of the adapters' sum."""
    return sum(int(_config(folder)["r"]) for folder in adapters)


def compose(adapters: list[Path], out: Path, base: str) -> Path:
    """Write the sum of `adapters` (each a PEFT LoRA folder on the same base) into `out`, atomically; a folder
    already written there is reused (callers key `out` by the adapters' content)."""
    if (out / WEIGHTS).is_file():
        return out
    from safetensors.torch import load_file, save_file

    configs = [_config(folder) for folder in adapters]
    tensors = [load_file(str(folder / WEIGHTS)) for folder in adapters]
    summed = {}
    for module in _modules(tensors):
        blocks = [_blocks(module, t, c, tensors) for t, c in zip(tensors, configs, strict=True)]
        summed[module + A] = _cat([a for a, _ in blocks], 0)
        summed[module + B] = _cat([b for _, b in blocks], 1)
    total = rank(adapters)
    targets = sorted({m for c in configs for m in c["target_modules"]})
    config = {**configs[0], "r": total, "lora_alpha": total, "lora_dropout": 0.0, "target_modules": targets,
              "base_model_name_or_path": base, "rank_pattern": {}, "alpha_pattern": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(summed, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, out)
    except OSError:
        if not (out / WEIGHTS).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{folder / CONFIG}: not a readable adapter config ({type(err).__name__})") from None
    for key, why in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA"), ("modules_to_save", "saved full modules"),
                     ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas")):
        if config.get(key):
            raise AdapterError(f"{folder}: an adapter with {why} ({key}) cannot be summed into one LoRA; serve this "
                               f"policy with serve.engine: transformers")
    if config.get("peft_type", "LORA") != "LORA" or config.get("bias", "none") != "none":
        raise AdapterError(f"{folder}: only plain LoRA adapters (no bias) can be summed; serve this policy with "
                           f"serve.engine: transformers")
    return config


def _modules(tensors: list[dict]) -> list[str]:
    found = {key.removesuffix(A) for t in tensors for key in t if key.endswith(A)}
    return sorted(found)


def _blocks(module: str, t: dict, config: dict, every: list[dict]):
    """This adapter's A rows and scaled B columns for `module` (zeros of its rank where it does not target it)."""
    import torch

    r, scale = int(config["r"]), float(config["lora_alpha"]) / float(config["r"])
    if module + A in t:
        return t[module + A].float(), t[module + B].float() * scale
    other = next(x for x in every if module + A in x)
    return (torch.zeros(r, other[module + A].shape[1]), torch.zeros(other[module + B].shape[0], r))


def _cat(blocks: list, dim: int):
    import torch

    return torch.cat(blocks, dim=dim).contiguous()

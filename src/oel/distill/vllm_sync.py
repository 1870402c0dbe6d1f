"""The LoRA student's weights as colocated vLLM receives them, computed beside the base weights, never in them.

TRL's VLLMGeneration syncs a PEFT student by merging the adapter into the base weights in place, reading them,
and unmerging (`merge_adapter()` ... `unmerge_adapter()`). On a bf16 base each add and subtract rounds, so after
every sync the base is a little further from the round-start weights; and that base with the adapter disabled
is the frozen teacher (`teacher_model_kind="base"`). Here each LoRA layer's merged weight is computed out of
place, `base + B @ A x scaling` rounded once to the base dtype (what PEFT's merge writes), and the base is only
read. Layers PEFT merges some other way (DoRA and other variants, a LoRA bias, non-Linear LoRA layers) keep
TRL's path; the project's LoraConfig uses none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import MethodType

import torch

log = logging.getLogger(__name__)


def _full(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2-sharded DTensor gathered whole (a collective: every process iterates); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_layers(model) -> dict[int, object] | None:
    """id(base weight) -> its LoRA Linear layer, or None when a layer needs PEFT's own merge."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    out: dict[int, object] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if (not isinstance(module, Linear) or any(a in module.lora_variant for a in adapters)
                or any(module.lora_bias.get(a, False) for a in adapters)):
            return None
        out[id(module.get_base_layer().weight)] = module
    return out


def delta(layer, adapter: str) -> torch.Tensor:
    """B @ A x scaling in float32 (PEFT's get_delta_weight, from gathered shards when sharded)."""
    from peft.utils.other import transpose

    a = _full(layer.lora_A[adapter].weight).float()
    b = _full(layer.lora_B[adapter].weight).float()
    return transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[adapter]


def merged_named_params(model, fix_name, layers: dict[int, object]) -> Iterator[tuple[str, torch.Tensor]]:
    """(vLLM name, tensor) for every weight vLLM holds, LoRA layers merged out of place. Names as TRL maps them."""
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if model.prefix in name or "original_module" in name:  # adapter weights; modules_to_save's original
            continue
        name = fix_name(name, extra_prefixes=["modules_to_save.default."])
        weight = _full(param.detach())
        layer = layers.get(id(param))
        if layer is not None:
            merged = weight.float()
            for adapter in (a for a in layer.active_adapters if a in layer.lora_A):
                merged = merged + delta(layer, adapter).to(merged.device)
            weight = merged.to(weight.dtype)
        yield name, weight


def keep_base_exact(generation) -> bool:
    """Make a TRL VLLMGeneration sync a PEFT student without merging into its base; False where TRL's own path
    stays (no PEFT, FSDP1, or a LoRA layer PEFT merges another way)."""
    from accelerate.utils import is_peft_model

    model = generation.model
    if not is_peft_model(model) or generation._dist.fsdp_version == 1:
        return False
    layers = lora_layers(model)
    if layers is None:
        log.warning("vLLM weight sync: a LoRA layer with a variant or bias; TRL merges it into the base in place")
        return False

    def _iter_named_params(self):
        # ZeRO-3 gathers every parameter for the walk (as TRL does); a no-op otherwise, and under FSDP2 _full
        # gathers each tensor instead.
        with self._dist.gather_params(list(model.parameters())):
            yield from merged_named_params(model, self._fix_param_name_to_vllm, layers)

    generation._iter_named_params = MethodType(_iter_named_params, generation)
    return True

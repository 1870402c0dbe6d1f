"""Per-layer switches on a model being trained: which decoder layers recompute in backward, and PEFT's input cast
in the LoRA layers. No TRL here (bench/distill.py uses them on TRL's stock trainer too)."""

from __future__ import annotations

from contextlib import contextmanager


def checkpointed(n_layers: int, share: float) -> list[bool]:
    """Which of n layers recompute in backward: round(share x n) of them, evenly spaced."""
    return [int((i + 1) * share + 1e-9) > int(i * share + 1e-9) for i in range(n_layers)]


def decoder_layers(model) -> list:
    """The layers transformers can checkpoint (each holds its own `gradient_checkpointing` flag)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def partial_checkpointing(model, share: float) -> tuple[int, int]:
    """Keep gradient checkpointing on in `share` of the decoder layers where it is on in all of them; returns
    (checkpointed, layers). HF turns it on in every layer, and TRL turns it off and on again around each
    generation, so this runs after both."""
    layers = decoder_layers(model)
    if share >= 1.0 or not all(m.gradient_checkpointing for m in layers):
        return sum(bool(m.gradient_checkpointing) for m in layers), len(layers)
    keep = checkpointed(len(layers), share)
    for layer, on in zip(layers, keep, strict=True):
        layer.gradient_checkpointing = on
    return sum(keep), len(layers)



@contextmanager
def lora_input_casting(model, enabled: bool):
    """Set PEFT's cast of each LoRA layer's input to the adapter's dtype on or off, restored on exit.

    Under bf16 autocast the cast is wasted work: PEFT copies a bf16 input to float32 for the fp32 adapter and
    autocast copies it back to bf16 for the matmul, the same values (loss and gradients are bit-identical,
    tests/integration/test_distill_prefix.py), two copies per LoRA layer in forward, recompute and backward.
    Outside autocast (sampling) the cast is needed: a bf16 input cannot meet fp32 weights."""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A")]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = enabled
    try:
        yield
    finally:
        for m, value in zip(layers, before, strict=True):
            m.cast_input_dtype_enabled = value


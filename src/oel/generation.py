"""The generation setting turned into engine arguments, with one-line refusals when an engine cannot run.

Lower layer, no model or rollout imports: oel.rollout.factory.build_backend (collect, extract, eval, the
OOD probe) and the distill stage (TRL's vLLM colocate mode) both read `generation` through here.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from oel.config import GenerationParams, Params
from oel.errors import UserError

log = logging.getLogger(__name__)


class BackendError(UserError, RuntimeError):
    """A backend that cannot run here (missing package, no GPU, bad model); one line naming the fix."""


def check_backend(gen: GenerationParams) -> None:
    """One line, before any weights load, when the chosen engine cannot run here."""
    if gen.backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise BackendError("generation.backend: vllm needs the vllm package, which is not installed: "
                           "install the GPU lock on a CUDA machine (docs/gpu.md: pip install -r "
                           "requirements-gpu-py311.lock), or set generation.backend: transformers")
    if not _cuda_visible():
        raise BackendError("generation.backend: vllm needs a CUDA GPU and none is visible; "
                           "set generation.backend: transformers")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_engine_args(params: Params) -> dict[str, Any]:
    """vllm.LLM keyword arguments from the generation section (and the model's own switches)."""
    gen = params.generation
    args: dict[str, Any] = {"gpu_memory_utilization": gen.gpu_memory_utilization,
                            "tensor_parallel_size": gen.tensor_parallel_size,
                            "dtype": params.model.dtype if gen.dtype == "auto" else gen.dtype,
                            "trust_remote_code": params.model.trust_remote_code}
    if gen.max_model_len:
        args["max_model_len"] = gen.max_model_len
    return args


def distill_sampling_args(params: Params) -> dict[str, Any]:
    """TRL SDFTConfig's vLLM fields for distill's student samples: colocate mode (the engine lives in the
    training process, on its GPU, and TRL syncs the student's weights into it before each generation)."""
    gen = params.generation
    if gen.backend != "vllm":
        return {"use_vllm": False}
    if params.distill.mode == "off_policy":
        # The frozen teacher samples in off_policy; TRL's vLLM engine holds the training student's weights.
        log.info("distill.mode off_policy: the frozen teacher samples with transformers generate; "
                 "generation.backend vllm serves the other stages")
        return {"use_vllm": False}
    check_backend(gen)
    return {"use_vllm": True, "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": gen.colocate_memory_utilization,
            "vllm_tensor_parallel_size": gen.tensor_parallel_size,
            "vllm_max_model_length": gen.max_model_len or None}

"""vLLM generation behind the same Backend interface (GPU users; the GPU environment of docs/gpu.md).

vllm is imported only when this backend is built, so CPU installs never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oel.config import SamplingParams
from oel.rollout.backend import BackendError, ChatTokenizing, Generation, special_strings
from oel.schemas import Message


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise BackendError("the vLLM backend needs the vllm package: on a CUDA machine, pip install -r "
                           "requirements-gpu-py311.lock (or -py312) and pip install --no-deps -e . (docs/gpu.md), "
                           "or use the transformers backend") from None
    return vllm


class VLLMBackend(ChatTokenizing):
    """`model`: a transformers folder or hub id with full weights (oel.rollout.factory.build_backend merges
    adapter policies first). Extra keyword arguments go to vllm.LLM (gpu_memory_utilization, ...)."""

    def __init__(self, model: str | Path, thinking: bool = False, seed: int = 0, **engine_kwargs: Any):
        vllm = _import_vllm()
        self._vllm = vllm
        self.thinking = thinking
        self.llm = vllm.LLM(model=str(model), seed=seed, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._specials = special_strings(self.tokenizer)

    def generate(self, prompts: list[list[Message]], sampling: SamplingParams,
                 seed: int | None = None) -> list[Generation]:
        if not prompts:
            return []
        # Token ids, not strings: vLLM would add a second BOS to an already templated prompt.
        inputs = [{"prompt_token_ids": ids} for ids in self.prompt_ids(prompts)]
        params = [self._params(sampling, None if seed is None else seed + i) for i in range(len(prompts))]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        # vLLM's token_ids include the EOS that stopped a sequence, matching Generation.n_tokens.
        return [Generation(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outs]

    def _params(self, sampling: SamplingParams, seed: int | None):
        greedy = sampling.temperature == 0
        # Per-request seeds: a sequence's sample does not depend on what else is in the batch.
        return self._vllm.SamplingParams(
            temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            top_k=-1 if greedy or sampling.top_k == 0 else sampling.top_k,
            max_tokens=sampling.max_new_tokens, seed=seed)

    def loglik(self, texts: list[str]) -> tuple[float, int]:
        """(sum of log p(token | prefix), scored tokens) over plain texts, no chat template; the first
        token of each text has no context and is not scored (as TransformersBackend.loglik)."""
        rows = [ids for ids in self.tokenizer(texts)["input_ids"] if len(ids) >= 2]
        if not rows:
            return 0.0, 0
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in rows], params, use_tqdm=False)
        total = 0.0
        for out, ids in zip(outs, rows, strict=True):
            # prompt_logprobs[0] is None (no context); entry i maps token ids to Logprob, ids[i] included.
            total += sum(step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], ids[1:], strict=True))
        return total, sum(len(ids) - 1 for ids in rows)

    def close(self) -> None:
        """Shut the engine down so the next one (eval's teacher after its student) gets the GPU.

        vLLM's v1 `LLMEngine` has no shutdown() of its own (only __del__, which runs whenever the last reference
        goes): its engine core client does, and stops the engine core and its workers. vLLM's own
        cleanup_dist_env_and_memory then drops its parallel groups, collects and empties the CUDA cache; without
        both, the next engine at gpu_memory_utilization 0.85 may find most of the GPU still held."""
        engine, self.llm = self.llm, None
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del engine
        import gc

        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:  # a vLLM without it: free what torch holds
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            cleanup_dist_env_and_memory()

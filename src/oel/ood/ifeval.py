"""`eval.ood: ifeval`: lm-eval's IFEval task (google/IFEval, 541 prompts) on the round's policy, as the paper ran it.

The shipped probe (oel.ood.probe, `eval.ood: true`) stays the offline default. This path needs the `ifeval`
extra, a CUDA GPU, the IFEval data (the hub, or the HF datasets cache) and nltk's punkt_tab (IFEval's
sentence counts); check_requirements refuses each missing one in one line before any weights load, at
`oel validate` and at eval start. The policy is served as every engine sees it: oel.models.merge's
servable_folder (a LoRA chain merged once into .cache/merged/<fingerprint>/, a base model as its own folder
or hub id), through lm-eval's `vllm` model when generation.backend is vllm, else its `hf` model on CUDA.
Settings follow the paper's README: chat template applied, thinking off unless model.thinking, eval.sampling
(0.7 / 0.8 / 20), the task's own 1280-token answers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from oel.config import IFEVAL, Params, SamplingParams
from oel.errors import UserError
from oel.metrics import wilson_interval

log = logging.getLogger(__name__)
TASK = "ifeval"
DATASET = "google/IFEval"           # lm_eval/tasks/ifeval/ifeval.yaml: dataset_path
PUNKT = "tokenizers/punkt_tab"      # lm_eval/tasks/ifeval/instructions_util.py fetches it at import if missing
# The task's four metrics; `instruction_pass` / `instruction_level_pass` alias the strict ones so the
# report, plots, DVC metrics and the promotion gate read an IFEval block as they read the probe's.
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
MODULES = ("lm_eval", "nltk", "langdetect", "immutabledict")  # lm-eval[ifeval] imports all of them
OFF = "or set eval.ood: true for the offline probe"


class IFEvalError(UserError, RuntimeError):
    """eval.ood: ifeval cannot run here; one line naming what is missing and the fix."""


def enabled(params: Params) -> bool:
    return params.eval.ood == IFEVAL


def check_requirements(params: Params) -> None:
    """One line for the first missing requirement of `eval.ood: ifeval`, before any model loads."""
    if not enabled(params):
        return
    missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise IFEvalError(f"eval.ood: ifeval needs lm-eval: pip install -e '.[ifeval]' (pins: -c "
                          f"requirements-ifeval.lock; missing here: {', '.join(missing)}), {OFF}")
    if not _cuda_visible():
        raise IFEvalError(f"eval.ood: ifeval needs a CUDA GPU and none is visible (541 prompts, answers of up to "
                          f"1280 tokens), {OFF}")
    offline = hub_offline()
    if not dataset_cached():
        endpoint = _hub_endpoint()
        why = ("HF_HUB_OFFLINE=1 is set" if offline else
               None if _reachable(f"{endpoint}/api/datasets/{DATASET}") else f"{endpoint} is not reachable")
        if why:
            raise IFEvalError(f"eval.ood: ifeval needs the {DATASET} dataset: it is not in the HF datasets cache "
                              f"({_datasets_cache()}) and {why}; run once with network (unset HF_HUB_OFFLINE; "
                              f"under make, which sets it: HF_HUB_OFFLINE=0), {OFF}")
    if not punkt_present():
        why = "HF_HUB_OFFLINE=1 is set" if offline else None if _reachable(_nltk_index()) else "it is not reachable"
        if why:
            raise IFEvalError(f"eval.ood: ifeval needs nltk's punkt_tab data (IFEval counts sentences with it): "
                              f"not found and {why}; run `python -m nltk.downloader punkt_tab` with network, {OFF}")


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def hub_offline() -> bool:
    """Offline as datasets decides it: HF_DATASETS_OFFLINE when set, else HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE."""
    def true(name: str) -> bool:
        return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}

    if os.environ.get("HF_DATASETS_OFFLINE") is not None:
        return true("HF_DATASETS_OFFLINE")
    return true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE")


def _datasets_cache() -> Path:
    from datasets import config

    return Path(config.HF_DATASETS_CACHE)


def dataset_cached() -> bool:
    """IFEval prepared in the HF datasets cache, where datasets looks when the hub cannot be reached
    (datasets.load.CachedDatasetModuleFactory: <cache>/<namespace>___<snake_name>/<config>/<version>/<hash>/)."""
    from datasets.naming import camelcase_to_snakecase

    namespace, name = DATASET.split("/")
    root = _datasets_cache() / f"{namespace}___{camelcase_to_snakecase(name)}"
    return any(path.is_dir() for path in root.glob("*/*/*"))


def punkt_present() -> bool:
    import nltk

    try:
        nltk.data.find(PUNKT)
    except LookupError:
        return False
    return True


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _nltk_index() -> str:
    from nltk.downloader import Downloader

    return Downloader.DEFAULT_URL


def _reachable(url: str, timeout: float = 10.0) -> bool:
    """Any HTTP answer below 500 counts: the network and the server are there."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def model_config(params: Params, folder: str) -> tuple[str, dict[str, Any]]:
    """lm-eval's model type and model_args for a servable folder (or hub id) under generation.backend."""
    from oel.generation import vllm_engine_args

    args: dict[str, Any] = {"pretrained": folder, "trust_remote_code": params.model.trust_remote_code,
                            "enable_thinking": params.model.thinking}
    if params.model.thinking:
        args["think_end_token"] = "</think>"  # lm-eval scores the answer after it
    if params.model.revision and not Path(folder).is_dir():
        args["revision"] = params.model.revision  # a hub id at a pinned revision
    if params.generation.backend == "vllm":
        # gpu_memory_utilization, tensor_parallel_size, dtype, trust_remote_code, max_model_len: the engine
        # every other stage builds (oel.generation), passed through lm-eval's vllm model to vllm.LLM.
        return "vllm", {**args, **vllm_engine_args(params), "seed": params.seed}
    args |= {"dtype": params.model.dtype, "device": "cuda"}
    if params.generation.max_model_len:
        args["max_length"] = params.generation.max_model_len
    return "hf", args


def gen_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """eval.sampling over the task's generation_kwargs (its until and 1280-token max_gen_toks stay)."""
    if sampling.temperature == 0.0:
        return {"do_sample": False, "temperature": 0.0}
    out: dict[str, Any] = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.top_k:
        out["top_k"] = sampling.top_k
    return out


def run_ifeval(params: Params, spec: str | Path, root: Path = Path(".")) -> dict[str, Any]:
    """Score one policy (a policy folder or model spec) on IFEval; the OOD block's numbers."""
    import lm_eval

    from oel.models.merge import servable_folder

    folder = servable_folder(str(spec), params.model, root)
    model, model_args = model_config(params, folder)
    log.info("OOD: lm-eval %s on %s via its %s model (%s)", TASK, folder, model, spec)
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=[TASK],
        batch_size="auto" if model == "vllm" else params.eval.batch_size,
        apply_chat_template=True, gen_kwargs=gen_kwargs(params.eval.sampling),
        random_seed=params.seed, numpy_random_seed=params.seed, torch_random_seed=params.seed,
        fewshot_random_seed=params.seed, bootstrap_iters=0, log_samples=False)
    _free_gpu()
    if results is None:  # lm-eval returns None off rank 0; eval runs single-process
        raise IFEvalError("eval.ood: ifeval: lm-eval returned no results (not rank 0?); run eval in one process")
    return {**scores(results), "model": model, "pretrained": folder}


def scores(results: dict[str, Any]) -> dict[str, Any]:
    """simple_evaluate's results -> the OOD block: the four metrics, the two aliases, the prompt count and
    a Wilson 95% interval on the prompt-level strict accuracy (as the probe reports its pass rate)."""
    task = results["results"][TASK]
    metrics = {name: float(task[f"{name},none"]) for name in METRICS}
    prompts = int(results.get("n-samples", {}).get(TASK, {}).get("effective", 0))
    low, high = wilson_interval(round(metrics["prompt_level_strict_acc"] * prompts), prompts)
    return {"source": IFEVAL, "instruction_pass": metrics["prompt_level_strict_acc"],
            "instruction_ci_low": low, "instruction_ci_high": high,
            "instruction_level_pass": metrics["inst_level_strict_acc"], "prompts": prompts, "ifeval": metrics}


def compare_to_base(current: dict[str, Any], base: dict[str, Any] | None, threshold: float) -> dict[str, Any]:
    """Flag forgetting: prompt- or instruction-level strict accuracy down by more than `threshold` (absolute)."""
    if not base:
        return {"flag": False}
    d_prompt = current["instruction_pass"] - base["instruction_pass"]
    d_inst = current["instruction_level_pass"] - base["instruction_level_pass"]
    flag = d_prompt < -threshold or d_inst < -threshold
    if flag:
        log.warning("OOD drop vs base on IFEval: prompt-level strict %+.3f, instruction-level strict %+.3f "
                    "(threshold %.3f)", d_prompt, d_inst, threshold)
    return {"flag": flag, "instruction_pass_delta": d_prompt, "instruction_level_pass_delta": d_inst}


def _free_gpu() -> None:
    # lm-eval builds its engine inside simple_evaluate and drops it on return: collect it now (eval runs
    # IFEval after its other engines, but a log round scores two policies in a row).
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - lm-eval's hf model brings torch
        pass

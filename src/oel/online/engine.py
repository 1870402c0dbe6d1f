"""The serving engines: their commands, the name each policy is served under, and the requests that load versions.

Every policy is served under a versioned name, `oel-base`, `oel-r3`: the gateway routes by name, a swap points the
endpoint at a new name, and the previous one stays loaded for a rollback. A name is never loaded again with other
weights (vLLM keeps a same-name reload's old prefix-cache entries; transformers serve caches models by name).

transformers  `transformers serve` (ships with transformers), started in a folder of links named after the versions
              (`.cache/serve/versions/oel-r3/*` -> the policy's merged folder, sampling on in its generation
              config), so the model a request names is the version's name. Versions load on request, or ahead of a swap through POST /load_model.
vllm          `vllm serve` on the base model, served as `oel-base`, with runtime LoRA updating on: each round's
              adapter is loaded as its own name (POST /v1/load_lora_adapter) and unloaded two swaps later. vLLM
              applies one adapter on top of its base, so a round whose policy stacks adapters (a round started
              from another trained round) is served as their sum, one adapter (oel.online.lora).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oel.config import Params
from oel.errors import UserError
from oel.models.loading import policy_chain
from oel.paths import ProjectPaths

PREFIX = "oel-"
HOST = "127.0.0.1"  # the engine answers the gateway only
# vLLM's --max-lora-rank accepts these values only.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ServeError(UserError, RuntimeError):
    """Serving cannot start or change as asked; one line naming the cause and the fix."""


def served_name(policy: str) -> str:
    """`base` -> `oel-base`, `r3` -> `oel-r3`: the engine's name for a policy."""
    return f"{PREFIX}{policy}"


def policy_of(name: str) -> str:
    return name.removeprefix(PREFIX)


def engine_kind(params: Params) -> str:
    if params.serve.engine != "auto":
        return params.serve.engine
    return "vllm" if params.generation.backend == "vllm" else "transformers"


def engine_url(params: Params) -> str:
    return f"http://{HOST}:{params.serve.engine_port}"


def versions_dir(root: Path) -> Path:
    return ProjectPaths(root).cache / "serve" / "versions"


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the caller's environment
    cwd: Path | None = None
    secret_env: tuple[str, ...] = ()  # names in env whose values are never logged


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: dict[str, Any] | None = None


def _tool(name: str) -> str:
    """The console script of this environment, whatever PATH holds."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def transformers_command(params: Params, root: Path, dtype: str) -> Command:
    serve = params.serve
    argv = [_tool("transformers"), "serve", "--host", HOST, "--port", str(serve.engine_port),
            "--device", params.model.device, "--dtype", dtype, "--model-timeout", str(serve.unload_idle_s),
            "--log-level", "warning"]
    if params.model.trust_remote_code:
        argv.append("--trust-remote-code")
    # Run in the versions folder: transformers serve takes a request's model name as a path when one exists there.
    return Command(argv, {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}, versions_dir(root))


def vllm_command(params: Params, base_folder: str, max_lora_rank: int, api_key: str) -> Command:
    gen, serve = params.generation, params.serve
    argv = [_tool("vllm"), "serve", base_folder, "--host", HOST, "--port", str(serve.engine_port),
            "--served-model-name", served_name("base"), "--enable-lora", "--max-loras", str(serve.max_loras),
            "--max-lora-rank", str(max_lora_rank), "--gpu-memory-utilization", str(gen.gpu_memory_utilization),
            "--tensor-parallel-size", str(gen.tensor_parallel_size), "--dtype", gen.dtype]
    if gen.max_model_len:
        argv += ["--max-model-len", str(gen.max_model_len)]
    if params.model.trust_remote_code:
        argv.append("--trust-remote-code")
    # Runtime adapter loading is off unless asked for (vLLM calls it risky in production: anyone who reaches
    # the port can load an adapter); the key keeps the engine to the gateway, which holds it as its secret.
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": api_key}
    return Command(argv, env, None, ("VLLM_API_KEY",))


def lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of this rank."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ServeError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({LORA_RANKS[-1]}); lower "
                     f"distill.lora.r or serve with serve.engine: transformers")


def load_request(kind: str, name: str, source: Path | None) -> Request | None:
    """What makes the engine hold a version before the gateway routes to it (None: nothing to load)."""
    if kind == "transformers":
        return Request("POST", "/load_model", {"model": name})
    if source is None:  # vllm serves its base model under its own name from the start
        return None
    return Request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(source)})


def unload_request(kind: str, name: str) -> Request | None:
    """What frees a version no route names any more (transformers serve unloads idle versions by itself)."""
    if kind != "vllm" or name == served_name("base"):
        return None
    return Request("POST", "/v1/unload_lora_adapter", {"lora_name": name})


def adapter_source(policy_dir: Path) -> tuple[str, list[Path]]:
    """vLLM: (the base model spec or merged folder the chain starts from, its adapter folders, newest first)."""
    chain = policy_chain(policy_dir)
    folder, manifest = chain[-1]
    base = str(folder) if manifest.merged else str(manifest.model)
    return base, [f / m.adapter for f, m in chain if m.adapter]


SOURCE_FILE = ".oel-source"  # in a version folder: the policy folder its files link to
GENERATION_CONFIG = "generation_config.json"


def link_version(root: Path, name: str, folder: Path) -> Path:
    """versions/<name>/: a link to each file of `folder`, but generation_config.json, written with do_sample on.

    transformers serve starts from the model's generation config and only ever turns sampling off (a request's
    temperature 0); with the config's do_sample off, as in SmolLM2's, every answer would be greedy whatever the
    request asks, where an OpenAI client expects its temperature (default 1) to sample. Writing do_sample on in the
    served copy makes a request's temperature and top_p mean what they say, and 0 still means greedy; the
    policy's own folder is not touched. A name already made from another folder is refused: the engine may hold
    its old weights."""
    import json
    import shutil

    target = folder.resolve()
    version = versions_dir(root) / name
    if version.is_symlink() or version.exists():
        if _source_of(version) == target:
            return version
        raise ServeError(f"{name} is served from {_source_of(version)}, and its policy now holds other weights "
                         f"({target}); restart `oel serve` to serve them (a served name is never reloaded in place)")
    tmp = version.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for entry in target.iterdir():
        if entry.name != GENERATION_CONFIG and not entry.name.startswith("."):
            (tmp / entry.name).symlink_to(entry)
    config_path = target / GENERATION_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, ValueError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ServeError(f"{config_path}: not a readable generation config ({err}); rebuild the policy "
                         f"(`dvc repro distill@<round>`)") from None
    if not isinstance(config, dict):
        config = {}
    (tmp / GENERATION_CONFIG).write_text(json.dumps({**config, "do_sample": True}, indent=1), encoding="utf-8")
    (tmp / SOURCE_FILE).write_text(str(target), encoding="utf-8")
    os.replace(tmp, version)
    return version


def _source_of(version: Path) -> Path | None:
    try:
        return Path((version / SOURCE_FILE).read_text(encoding="utf-8"))
    except OSError:
        return version.resolve() if version.is_symlink() else None


def clear_versions(root: Path) -> None:
    """A fresh engine holds no version: the links of an earlier one go."""
    import shutil

    folder = versions_dir(root)
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_symlink():
                entry.unlink()
            elif entry.is_dir():
                shutil.rmtree(entry)

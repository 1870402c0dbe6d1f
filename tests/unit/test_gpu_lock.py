"""The GPU locks (requirements-gpu-py311.lock, -py312.lock; scripts/gpu_check/lock.sh) against the packages' own
metadata, offline: TRL's accepted vLLM range from the installed TRL's Requires-Dist, vLLM's requirements from its
registry metadata read once into tests/fixtures/gpu/vllm-<version>.json. A lock that a pip resolver would refuse
on one of these fails here, before anyone tries it on a GPU box."""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCKS = {"3.11": REPO / "requirements-gpu-py311.lock", "3.12": REPO / "requirements-gpu-py312.lock"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# The packages the GPU path is built on keep pyproject's exact pins in the GPU environment.
CORE = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            out[canonicalize_name(name)] = version
    return out


def pyproject_pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for text in requirements:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            out[canonicalize_name(req.name)] = exact[0]
    return out


def linux_x86_64(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix", extra="")
    return env


def vllm_version() -> str:
    (version,) = {pins(lock)["vllm"] for lock in LOCKS.values()}  # one vLLM for both Pythons
    return version


def vllm_facts() -> dict:
    return json.loads((REPO / "tests" / "fixtures" / "gpu" / f"vllm-{vllm_version()}.json").read_text())


def test_the_gpu_extra_admits_the_locked_vllm():
    (extra,) = [Requirement(r) for r in PYPROJECT["optional-dependencies"]["gpu"]]
    assert extra.name == "vllm" and extra.specifier.contains(vllm_version())
    assert vllm_facts()["version"] == vllm_version()


@pytest.mark.parametrize("python", sorted(LOCKS))
def test_every_project_dependency_is_locked_at_its_pin(python):
    # ...except the ones the lock's header says it left free (they cannot share an environment with vLLM).
    lock = LOCKS[python].read_text()
    (line,) = [x for x in lock.splitlines() if x.startswith("# Left free")]
    free = {canonicalize_name(n) for n in line.split(":", 1)[1].split()}
    locked = pins(LOCKS[python])
    wrong = {n: (v, locked.get(n)) for n, v in pyproject_pins(PYPROJECT["dependencies"]).items()
             if n not in free and locked.get(n) != v}
    assert wrong == {}
    assert free <= set(locked)


def test_trl_accepts_the_locked_vllm():
    trl = importlib.metadata.distribution("trl")
    assert trl.version == pyproject_pins(PYPROJECT["dependencies"])["trl"]  # the metadata read is the pinned TRL's
    (vllm,) = [Requirement(r) for r in trl.requires if Requirement(r).name == "vllm"]
    assert vllm.marker is not None and vllm.marker.evaluate({"extra": "vllm"})
    for python, lock in LOCKS.items():
        assert vllm.specifier.contains(pins(lock)["vllm"]), (python, str(vllm.specifier))


@pytest.mark.parametrize("python", sorted(LOCKS))
def test_every_requirement_of_vllm_is_met_by_the_lock(python):
    facts, locked, env = vllm_facts(), pins(LOCKS[python]), linux_x86_64(python)
    assert Requirement(f"python{facts['requires_python']}").specifier.contains(f"{python}.0")
    unmet = []
    for text in facts["requires_dist"]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra of vLLM's, or another platform
        version = locked.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{text} (locked: {version})")
    assert unmet == []


@pytest.mark.parametrize("python", sorted(LOCKS))
def test_the_gpu_path_keeps_the_project_pins(python):
    locked, project = pins(LOCKS[python]), pyproject_pins(PYPROJECT["dependencies"])
    assert {name: locked[name] for name in CORE} == {name: project[name] for name in CORE}


@pytest.mark.parametrize("python", sorted(LOCKS))
def test_the_header_names_every_pin_that_left_requirements_lock(python):
    # What a GPU user gets that the CPU suite did not test is stated in the lock itself.
    lock = LOCKS[python].read_text()
    (line,) = [x for x in lock.splitlines() if x.startswith("# moved from requirements.lock:")]
    stated = dict(re.findall(r"([\w.-]+) \S+ -> (\S+?)(?:,|$)", line.split(":", 1)[1]))
    cpu = {name: version.removesuffix("+cpu") for name, version in pins(REPO / "requirements.lock").items()}
    locked = pins(LOCKS[python])
    moved = {name: locked[name] for name in locked if name in cpu and cpu[name] != locked[name]}
    assert stated == moved

"""Write tests/fixtures/gpu/vllm-<version>.json: what the test suite needs to know of a vLLM release, read from
its own wheel and its registry metadata once, so the suite runs offline and never downloads vLLM.

    pip install --dry-run --no-deps --ignore-installed --only-binary :all: --platform manylinux_2_28_x86_64 \
        --python-version 3.12 --target .cache/vllm-meta --report report.json vllm==0.30.0     # metadata only (PEP 658)
    pip download --no-deps --only-binary :all: --platform manylinux_2_28_x86_64 --python-version 3.12 \
        -d .cache/vllm-wheel vllm==0.30.0                                                        # the wheel, for its source
    python scripts/gpu_check/vllm_facts.py report.json .cache/vllm-wheel/vllm-0.30.0-*.whl tests/fixtures/gpu/

The facts: Requires-Dist and Requires-Python (tests/unit/test_gpu_lock.py checks the GPU lock against them), the
fields of SamplingParams (a stand-in that refuses any other keyword, tests/unit/test_vllm_backend.py), and the
methods of the v1 engine classes an engine is shut down through.
"""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path


def class_members(source: str, name: str) -> tuple[list[str], list[str]]:
    """(annotated fields, methods) of a class defined at the top level of `source`."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields = [n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
            methods = [n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            return fields, methods
    raise SystemExit(f"class {name} not found")


def functions(source: str) -> list[str]:
    return [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]


def main(report: str, wheel: str, out_dir: str) -> None:
    meta = json.loads(Path(report).read_text())["install"][0]["metadata"]
    with zipfile.ZipFile(wheel) as zf:
        read = lambda path: zf.read(path).decode("utf-8")  # noqa: E731
        fields, _ = class_members(read("vllm/sampling_params.py"), "SamplingParams")
        _, engine = class_members(read("vllm/v1/engine/llm_engine.py"), "LLMEngine")
        _, client = class_members(read("vllm/v1/engine/core_client.py"), "EngineCoreClient")
        _, llm = class_members(read("vllm/entrypoints/llm.py"), "LLM")
        parallel = functions(read("vllm/distributed/parallel_state.py"))
    facts = {"name": meta["name"], "version": meta["version"], "requires_python": meta.get("requires_python"),
             "requires_dist": meta.get("requires_dist", []), "sampling_params_fields": fields,
             "llm_methods": llm, "v1_llm_engine_methods": engine, "v1_engine_core_client_methods": client,
             "distributed_parallel_state_functions": [f for f in parallel if "destroy" in f or "cleanup" in f]}
    out = Path(out_dir) / f"vllm-{meta['version']}.json"
    out.write_text(json.dumps(facts, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])

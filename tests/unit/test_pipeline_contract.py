"""dvc.yaml agrees with the code: paths with oel.paths, params with tracking.STAGE_SECTIONS, code deps
with what each stage module really imports (so editing distill code reruns distill and eval only)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from oel.config import STAGES
from oel.paths import ProjectPaths
from oel.tracking import STAGE_SECTIONS

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
MODULE_OF = {"eval": "evaluate"}
# Imported by stages but cannot change what a stage writes: logging, MLflow records, env, error text.
# paths.py is here because a path change has to be mirrored in dvc.yaml, which this test checks.
NO_EFFECT = {"oel", "oel.tracking", "oel.log", "oel.env", "oel.errors", "oel.paths", "oel.cli",
             "oel.stages"}
# Package data read at run time rather than imported: (folder, a string that shows a module reads it).
DATA_DIRS = {"src/oel/eval_data": "eval_data"}


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def expand(stage: dict, key: str = "r2", src: str = "r1") -> dict:
    """One foreach item, rendered the way DVC renders `${key}` / `${item.from}`."""
    text = yaml.safe_dump(stage["do"]).replace("${key}", key).replace("${item.from}", src)
    return yaml.safe_load(text)


def names(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def module_file(mod: str) -> Path | None:
    base = SRC / Path(*mod.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imports_of(path: Path) -> set[str]:
    """Every oel module imported anywhere in the file (top level or inside functions)."""
    pkg = ".".join(path.relative_to(SRC).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.removesuffix(".__init__")
    else:
        pkg = pkg.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return {m for m in found if m.split(".")[0] == "oel" and module_file(m)}


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo += [m for m in imports_of(module_file(mod)) if m not in NO_EFFECT]
        parent = mod.rpartition(".")[0]  # importing a.b runs a/__init__.py too
        if parent and parent not in NO_EFFECT:
            todo.append(parent)
    return seen - NO_EFFECT


def dep_unit(mod: str) -> str:
    """A module -> the dvc.yaml dep that covers it: stage files one by one, sub-packages whole."""
    parts = mod.split(".")
    if parts[1] == "stages":
        return f"src/oel/stages/{parts[2]}.py"
    if len(parts) == 2 and module_file(mod).name != "__init__.py":
        return f"src/oel/{parts[1]}.py"
    return f"src/oel/{parts[1]}"


def code_deps(module: str) -> set[str]:
    mods = closure(f"oel.stages.{module}") | closure("oel.stages._common")
    units = {dep_unit(m) for m in mods}
    sources = "".join(module_file(m).read_text() for m in mods)
    return units | {folder for folder, marker in DATA_DIRS.items() if marker in sources}


def declared_code(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.startswith("src/")}


def test_every_stage_declared():
    stages = dvc_stages()
    assert {"base", "eval_base", *STAGES} <= set(stages)
    for name in STAGES:
        assert stages[name]["foreach"] == "${rounds}", name
        assert stages[name]["do"]["cmd"] == f"oel {name} --round ${{key}}"


def tracked(sections) -> list:
    """What dvc.yaml must list: the params.yaml sections, then the same sections of the selected profile."""
    profiled = [f"${{profile}}.{s}" for s in sections if s not in ("profile", "seed")]
    return [*sections, {"src/oel/profiles.yaml": profiled}]


@pytest.mark.parametrize("stage", STAGES)
def test_params_are_the_sections_the_stage_reads(stage):
    *sections, profiled = tracked(STAGE_SECTIONS[stage])
    # collect also tracks its own round's declaration (where a round on a log names it), and no other round's.
    own = ["rounds.r2"] if stage == "collect" else []
    assert expand(dvc_stages()[stage])["params"] == [*sections, *own, profiled]


def test_eval_base_reads_what_eval_reads():
    stages = dvc_stages()
    assert stages["eval_base"]["params"] == tracked(STAGE_SECTIONS["eval"])
    assert declared_code(stages["eval_base"]) == declared_code(expand(stages["eval"]))


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_what_the_stage_imports(stage):
    if module_file(f"oel.stages.{MODULE_OF.get(stage, stage)}") is None:
        pytest.skip(f"oel.stages.{MODULE_OF.get(stage, stage)} not written yet")
    for dep in declared_code(expand(dvc_stages()[stage])):
        assert (REPO / dep).exists(), f"{stage}: dep {dep} does not exist"
    assert declared_code(expand(dvc_stages()[stage])) == code_deps(MODULE_OF.get(stage, stage))


def test_paths_match_oel_paths():
    stages = dvc_stages()
    rp = ProjectPaths(Path(".")).round("r2")
    prev = ProjectPaths(Path(".")).policy_dir("r1").as_posix()
    p = {s: expand(stages[s]) for s in STAGES}
    posix = lambda *paths: {x.as_posix() for x in paths}  # noqa: E731
    assert names(p["collect"]["outs"]) == posix(rp.trajectories)
    assert prev in p["collect"]["deps"]
    assert posix(rp.trajectories) <= set(p["extract"]["deps"])
    assert names(p["extract"]["outs"]) == posix(rp.items, rp.extract_summary)
    assert posix(rp.items, rp.trajectories) <= set(p["consolidate"]["deps"])
    assert names(p["consolidate"]["outs"]) == posix(rp.stores, rp.distill_rows)
    assert posix(rp.distill_rows, rp.stores) | {prev} <= set(p["distill"]["deps"])
    assert names(p["distill"]["outs"]) == posix(rp.model)
    assert posix(rp.model, rp.stores) <= set(p["eval"]["deps"])
    assert names(p["eval"]["outs"]) == posix(rp.eval_dir, rp.details)
    assert names(p["eval"]["metrics"]) == posix(rp.metrics_dir)
    assert names(p["eval"]["plots"]) == posix(rp.plots)
    assert rp.checkpoints.as_posix() not in str(p)  # resume state must survive DVC deleting outs


def test_eval_outputs_and_base_is_round_zero():
    stages = dvc_stages()
    base = ProjectPaths(Path(".")).round("base")
    assert stages["base"]["outs"] == ["models/base"] and stages["base"]["params"] == tracked(["model"])
    assert stages["eval_base"]["cmd"] == "oel eval --round base"
    assert "models/base" in stages["eval_base"]["deps"]
    # The breakdown is a plain out, not a metrics file; the metrics folder is cached, so other revisions'
    # metrics stay readable (`dvc metrics diff`, `dvc exp show`) although metrics/ is gitignored.
    assert {base.details.as_posix(): {"cache": False}} in stages["eval_base"]["outs"]
    assert stages["eval_base"]["metrics"] == [base.metrics_dir.as_posix()] == ["metrics/base"]
    assert expand(stages["eval"])["metrics"] == ["metrics/r2"]
    curve = {"template": "oel_curve", "x": "step", "y": "pass_rate"}
    assert stages["eval_base"]["plots"] == [{base.plots.as_posix(): curve}]
    assert expand(stages["eval"])["plots"] == [{"reports/r2/plots": curve}]


def test_the_curve_template_draws_what_curve_json_holds():
    """.dvc/plots/oel_curve.json (DVC's custom template folder) plots fields that curve_row writes."""
    import json

    from oel.plots import curve_row

    template = json.loads((REPO / ".dvc" / "plots" / "oel_curve.json").read_text())
    assert template["data"] == {"values": "<DVC_METRIC_DATA>"}
    fields = set(re.findall(r'"field": "(\w+)"', json.dumps(template)))
    row = curve_row(0, "base", {"heldout": {"overall": {"pass_rate": 0.5}}})
    assert {"pass_rate", "response_tokens_per_turn"} <= fields <= set(row) | {"rev"}


def test_analyzer_sees_lazy_imports(tmp_path):
    # The dep check is only as good as the import scan: a function-level import must count.
    assert "oel.models" in imports_of(SRC / "oel" / "stages" / "_common.py")


def test_params_yaml_holds_every_section_a_stage_tracks():
    """DVC fails a stage whose params section is absent from params.yaml (`Parameters 'x' are missing`), even
    when the section is all defaults: every tracked section stays there, if only as {}."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tracked_sections = {s for sections in STAGE_SECTIONS.values() for s in sections}
    assert tracked_sections - set(raw) == set()

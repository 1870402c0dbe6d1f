"""Corrupt state on disk (issue 20): every file the project reads back after an earlier stage, round or tool
wrote it, damaged the ways that happen (empty, cut short, random bytes, valid JSON of the wrong shape, a
reference that loops or leaves the project), read by the real `oel` command that reads it.

The contract: exit 2, exactly one `error:` line naming the file and the fix, no traceback, and data/, models/,
reports/ byte-identical. A cache that is safe to rebuild (the converted embedded model) is rebuilt instead,
with one log line saying so. Projects are built by hand (no reference round), and every command fails
before a model is loaded, so the whole matrix runs in about a minute."""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE
from tests.reliability.conftest import (
    make_project,
    oel,
    ok,
    one_error_line,
    reliability_raw,
    rng,
    tree_hashes,
)

TOPS = ("data", "models", "reports")
JUNK = b"\x89\xff\xfe\x00" + rng("corrupt-state").randbytes(300)  # never UTF-8, never JSON


def write(path: Path, content: bytes | str | dict | list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, (dict, list)):
        content = json.dumps(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def fails_cleanly(root: Path, *args: str, needles: tuple[str, ...] = (), tops: tuple[str, ...] = TOPS) -> str:
    """Run `oel *args`: one strict error line holding every needle, and nothing under `tops` changed."""
    before = tree_hashes(root, *tops)
    line = one_error_line(oel(root, *args), *needles)
    assert tree_hashes(root, *tops) == before, "a failing command changed the project"
    return line


@pytest.fixture
def proj(tmp_path) -> Path:
    """A project declaring r1 (from base) and r2 (from r1); nothing built yet."""
    raw = reliability_raw(rounds={"r1": {"from": "base"}, "r2": {"from": "r1"}})
    return make_project(tmp_path / "p", raw)


# ---- policy manifests, parent chains, adapter folders (read by every stage that loads a policy) ----------

def safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 8


def policies(root: Path, r1: dict | bytes, adapter: dict[str, bytes] | None = None) -> None:
    write(root / "models" / "base" / "policy.json", {"schema_version": 1, "model": "tiny-random", "round": "base"})
    write(root / "models" / "r1" / "policy.json", r1)
    for name, content in (adapter or {}).items():
        write(root / "models" / "r1" / "adapter" / name, content)


R1 = {"schema_version": 1, "parent": "../base", "round": "r1"}
ADAPTER = {**R1, "adapter": "adapter"}
GOOD_ADAPTER = {"adapter_config.json": b'{"base_model_name_or_path": "tiny-random"}',
                "adapter_model.safetensors": safetensors_bytes()}

POLICY_CASES = {
    "empty manifest": (b"", "empty file"),
    "manifest cut short": (b'{"schema_version": 1, "parent": "../ba', "invalid JSON"),
    "manifest random bytes": (JUNK, "not UTF-8"),
    "manifest a list": ([R1], "expected a JSON object, found a list"),
    "manifest wrong field type": ({**R1, "parent": 7}, "parent"),
    "manifest a bare string": (b'"../base"', "expected a JSON object, found a string"),
    "manifest nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
    "manifest field nested 100000 deep": (b'{"schema_version": 1, "parent": ' + b"[" * 100_000, "nested deeper"),
    "parent loops to itself": ({**R1, "parent": "../r1"}, "parent chain loops (r1 -> r1)"),
    "parent outside the project": ({**R1, "parent": "../../../.."}, "points outside"),
    "parent absolute path": ({**R1, "parent": "/tmp"}, "points outside"),
    "parent missing": ({**R1, "parent": "../r0"}, "is not a folder"),
    "adapter outside models": ({**R1, "adapter": "../../data"}, "points outside"),
    "adapter folder missing": (ADAPTER, "is not a folder"),
}


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_corrupt_policy_manifest_is_one_line(proj, case):
    manifest, what = POLICY_CASES[case]
    policies(proj, manifest)
    line = fails_cleanly(proj, "collect", "--round", "r2", "--params", "params.yaml", needles=(what,))
    assert "models/r1" in line and "oel distill --round r1" in line, line


def test_parent_chain_loop_across_two_rounds_is_one_line(proj):
    policies(proj, {**R1, "parent": "../r2"})
    write(proj / "models" / "r2" / "policy.json", {**R1, "parent": "../r1", "round": "r2"})
    fails_cleanly(proj, "collect", "--round", "r2", "--params", "params.yaml",
                  needles=("parent chain loops (r1 -> r2 -> r1)", "oel distill --round r1"))


def test_parent_symlinked_outside_the_project_is_refused(proj, tmp_path):
    outside = write(tmp_path / "elsewhere" / "policy.json", {"schema_version": 1, "model": "tiny-random"}).parent
    policies(proj, {**R1, "parent": "../linked"})
    (proj / "models" / "linked").symlink_to(outside)
    fails_cleanly(proj, "collect", "--round", "r2", "--params", "params.yaml",
                  needles=("parent '../linked' points outside", str(outside)))


ADAPTER_CASES = {
    "adapter config empty": ({**GOOD_ADAPTER, "adapter_config.json": b""}, "adapter_config.json:1: invalid JSON"),
    "adapter config random bytes": ({**GOOD_ADAPTER, "adapter_config.json": JUNK}, "not UTF-8"),
    "adapter config a list": ({**GOOD_ADAPTER, "adapter_config.json": b"[]"}, "expected a JSON object"),
    "adapter weights cut short": ({**GOOD_ADAPTER, "adapter_model.safetensors": safetensors_bytes()[:-3]},
                                  "adapter_model.safetensors is cut short"),
    "adapter weights random bytes": ({**GOOD_ADAPTER, "adapter_model.safetensors": JUNK}, "adapter_model.safetensors"),
    "adapter weights empty": ({**GOOD_ADAPTER, "adapter_model.safetensors": b""}, "is cut short"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_corrupt_adapter_folder_is_one_line_before_any_weights_load(proj, case):
    files, what = ADAPTER_CASES[case]
    policies(proj, ADAPTER, files)
    line = fails_cleanly(proj, "collect", "--round", "r2", "--params", "params.yaml", needles=(what,))
    assert "models/r1/adapter" in line and "oel distill --round r1" in line, line


def test_good_chain_checks_pass(tmp_path):
    from oel.models.loading import policy_chain

    policies(tmp_path, ADAPTER, GOOD_ADAPTER)
    assert [p.name for p, _ in policy_chain(tmp_path / "models" / "r1")] == ["r1", "base"]


# ---- the MLflow tracking store (mlruns/mlflow.db), opened by every stage before its work ----------------

def cut_database(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = path.with_name("whole.db")
    with sqlite3.connect(db) as conn:
        conn.execute("create table t (a)")
        conn.executemany("insert into t values (?)", [("x" * 1000,)] * 100)
    data = db.read_bytes()
    db.unlink()
    return data[: len(data) // 3]


@pytest.mark.parametrize("case", ["random bytes", "cut short"])
def test_tracking_store_that_is_not_a_database_is_one_line(proj, case):
    db = proj / "mlruns" / "mlflow.db"
    write(db, JUNK if case == "random bytes" else cut_database(db))
    write(proj / "data" / "r1" / "trajectories.jsonl", b"")  # something that must survive
    fails_cleanly(proj, "collect", "--round", "r1", "--params", "params.yaml", tops=(*TOPS, "mlruns"),
                  needles=("mlruns/mlflow.db", "not a usable SQLite database", "move it aside or delete it"))


# ---- knowledge: items.jsonl (consolidate), stores (eval / headroom), distill.jsonl (distill) ------------

def item(**overrides) -> dict:
    return {"schema_version": 1, "game": "frozenlake", "store": 0, "step": 0, "source_episode": "e1",
            "text": "Avoid holes.", "tokens": 3, **overrides}


GOOD_ITEMS = (json.dumps(item()) + "\n").encode()
JSONL_CASES = {
    "cut short": (lambda good: good[:-12], ":1: invalid JSON"),
    "random bytes": (lambda good: JUNK + b"\n", ":1: not UTF-8"),
    "a list per line": (lambda good: b"[1, 2]\n", ":1: expected a JSON object, found a list"),
    "wrong field type": (lambda good: good.replace(b'"store": 0', b'"store": "zero"'), ":1: store"),
    "a line nested 100000 deep": (lambda good: good + b"[" * 100_000 + b"]" * 100_000 + b"\n",
                                  ":2: nested deeper than 64 levels"),
    "a field nested 100000 deep": (lambda good: good.replace(b'"text": "Avoid holes."',
                                                             b'"text": ' + b"{\"a\": " * 100_000 + b"1" + b"}" * 100_000),
                                   ":1: nested deeper than 64 levels"),
}


@pytest.mark.parametrize("case", list(JSONL_CASES))
def test_corrupt_items_fail_consolidate_with_one_line(proj, case):
    edit, what = JSONL_CASES[case]
    write(proj / "data" / "r1" / "knowledge" / "items.jsonl", edit(GOOD_ITEMS))
    fails_cleanly(proj, "consolidate", "--round", "r1", "--params", "params.yaml",
                  needles=(f"items.jsonl{what}", "delete it and rerun `oel extract --round r1`"))


def test_corrupt_trajectories_leave_the_stores_alone(proj):
    """consolidate used to write the stores before reading trajectories.jsonl: a bad trajectory line left
    freshly rewritten stores behind. Both inputs are now read first."""
    write(proj / "data" / "r1" / "knowledge" / "items.jsonl", GOOD_ITEMS)
    write(proj / "data" / "r1" / "trajectories.jsonl", b'{"schema_version": 1, "episode_id": ')
    fails_cleanly(proj, "consolidate", "--round", "r1", "--params", "params.yaml",
                  needles=("trajectories.jsonl:1: invalid JSON", "oel collect --round r1"))
    assert not (proj / "data" / "r1" / "knowledge" / "stores").exists()


TRAJECTORY_SHAPES = {
    "a line nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: nested deeper than 64 levels"),
    "a list per line": (b'[{"schema_version": 1}]\n', ":1: expected a JSON object, found a list"),
    "a wrong-typed field": (b'{"schema_version": 1, "episode_id": 7}\n', ":1: episode_id: Input should be a valid string"),
}


@pytest.mark.parametrize("case", list(TRAJECTORY_SHAPES))
@pytest.mark.parametrize("command", ["extract", "eval"])
def test_trajectories_of_any_shape_or_depth_are_one_line(proj, case, command):
    content, what = TRAJECTORY_SHAPES[case]
    write(proj / "data" / "r1" / "trajectories.jsonl", content)
    fails_cleanly(proj, command, "--round", "r1", "--params", "params.yaml",
                  needles=(f"trajectories.jsonl{what}", "oel collect --round r1"))


# A distillation row has no `text`: its deep field is the row id.
DISTILL_CASES = {**JSONL_CASES, "a field nested 100000 deep": (
    lambda good: good.replace(b'"row_id": "x"', b'"row_id": ' + b"{\"a\": " * 100_000 + b"1" + b"}" * 100_000),
    ":1: nested deeper than 64 levels")}


@pytest.mark.parametrize("case", list(DISTILL_CASES))
def test_corrupt_distill_rows_fail_distill_with_one_line(proj, case):
    edit, what = DISTILL_CASES[case]
    good = json.dumps({"schema_version": 1, "row_id": "x", "episode_id": "e1", "game": "frozenlake", "turn": 0,
                       "store": 0, "prompt": [], "teacher_prompt": []}).encode() + b"\n"
    write(proj / "data" / "r1" / "distill.jsonl", edit(good))
    fails_cleanly(proj, "distill", "--round", "r1", "--params", "params.yaml",
                  needles=(f"distill.jsonl{what}", "oel consolidate --round r1"))


STORE_CASES = {"random bytes": (JUNK, "not UTF-8"), "NUL bytes": (b"- item\x00\x00\x00", "NUL byte")}


@pytest.mark.parametrize("case", list(STORE_CASES))
@pytest.mark.parametrize("command", ["headroom", "eval"])
def test_corrupt_store_fails_eval_before_any_work(proj, case, command):
    content, what = STORE_CASES[case]
    write(proj / "data" / "r1" / "knowledge" / "stores" / "frozenlake" / "store-0.md", content)
    fails_cleanly(proj, command, "--round", "r1", "--params", "params.yaml",
                  needles=("stores/frozenlake/store-0.md", what, "oel consolidate --round r1"))


def test_corrupt_store_fails_report_with_one_line(proj):
    write_finished_round(proj, "r1")
    write(proj / "data" / "r1" / "knowledge" / "stores" / "frozenlake" / "store-0.md", JUNK)
    fails_cleanly(proj, "report", "--params", "params.yaml", needles=("store-0.md", "not UTF-8"))


# ---- eval's breakdown (reports/<r>/eval.json) and curve.json of earlier rounds -------------------------

def write_finished_round(root: Path, round_id: str) -> Path:
    from oel.metrics import by_game

    return write(root / "reports" / round_id / "eval.json", {"heldout": by_game([])})


EVAL_CASES = {"empty": (b"", "invalid JSON"), "cut short": (b'{"heldout": {"overall": {"pass', "invalid JSON"),
              "random bytes": (JUNK, "not UTF-8"), "a list": (b"[1, 2, 3]", "expected a JSON object, found a list"),
              "nested 100000 deep": (b'{"heldout": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper")}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_corrupt_eval_breakdown_fails_report_with_one_line(proj, case):
    content, what = EVAL_CASES[case]
    write_finished_round(proj, "base")
    write(proj / "reports" / "r1" / "eval.json", content)
    fails_cleanly(proj, "report", "--params", "params.yaml",
                  needles=("reports/r1/eval.json", what, "delete it and rerun `oel eval --round r1`"))


def test_corrupt_curve_json_is_never_read_back(proj):
    """curve.json is for `dvc plots`; eval and report rebuild the curve from the eval.json files."""
    write_finished_round(proj, "r1")
    curve = write(proj / "reports" / "r1" / "plots" / "curve.json", JUNK)
    ok(oel(proj, "report", "--params", "params.yaml"))
    assert curve.read_bytes() == JUNK and (proj / "reports" / "summary.md").is_file()


# ---- the converted embedded model (.cache/models): a cache, rebuilt by itself ---------------------------

@pytest.fixture
def own_cache(proj) -> Path:
    """The project's own copy of tiny-random (the shared test cache must never be damaged); the 500 MB
    converted smollm2 it is built from stays a link to the shared cache."""
    cache = proj / ".cache" / "models"
    cache.unlink()
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(MODEL_CACHE / "smollm2-135m-instruct")
    shutil.copytree(MODEL_CACHE / "tiny-random", cache / "tiny-random")
    return cache / "tiny-random"


CACHE_CASES = {"config.json empty": ("config.json", b""), "config.json random bytes": ("config.json", JUNK),
               "weights cut short": ("model.safetensors", None), "weights random bytes": ("model.safetensors", JUNK)}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_damaged_model_cache_is_rebuilt_with_one_log_line(proj, own_cache, case):
    name, content = CACHE_CASES[case]
    target = own_cache / name
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2] if content is None else content)
    proc = ok(oel(proj, "base", "--params", "params.yaml"))
    said = [line for line in proc.stderr.splitlines() if "rebuilding" in line]
    assert len(said) == 1 and "tiny-random" in said[0] and "damaged" in said[0], proc.stderr
    assert "Traceback" not in proc.stderr
    from oel.models.embedded import _damage

    assert _damage(own_cache) is None and (own_cache / ".complete").is_file()


# ---- the iteration lock (data/.iteration.lock and its holder line) --------------------------------------

HOLD = ("import sys, time; from oel.rounds import iteration_lock\n"
        "with iteration_lock(sys.argv[1], 5):\n    print('held', flush=True); time.sleep(30)\n")


def test_damaged_lock_file_is_reused(proj):
    from oel.rounds import iteration_lock, iteration_lock_path

    write(iteration_lock_path(proj), JUNK)
    with iteration_lock(proj, 0.5) as path:
        assert path.is_file()


def test_damaged_holder_line_still_gives_one_busy_line(proj):
    from oel.errors import UserError
    from oel.rounds import iteration_lock, iteration_lock_path

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(proj)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        write(iteration_lock_path(proj).with_name(".iteration.lock.holder"), JUNK)
        with pytest.raises(UserError, match="another oel iteration is running .*holder unknown"):
            with iteration_lock(proj, 0.2):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_folder_at_the_lock_path_is_one_line(proj):
    from oel.errors import UserError
    from oel.rounds import iteration_lock, iteration_lock_path

    iteration_lock_path(proj).mkdir(parents=True)
    with pytest.raises(UserError, match=r"data/\.iteration\.lock: a folder .*delete it"):
        with iteration_lock(proj, 0.2):
            pass



# ---- dvc.lock: read by DVC itself (`dvc repro` / `dvc status`, which the flows run) ---------------------

DVC_LOCK_CASES = {"random bytes": (JUNK, "not valid utf-8"), "wrong shape": (b'schema: "2.0"\nstages: [1, 2]\n',
                                                                           "validation failed"),
                  "empty": (b"", "validation failed")}


@pytest.mark.parametrize("case", list(DVC_LOCK_CASES))
def test_corrupt_dvc_lock_is_refused_by_dvc_without_a_traceback(tmp_path, case):
    content, what = DVC_LOCK_CASES[case]
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    write(tmp_path / "dvc.yaml", "stages:\n  a:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    lock = write(tmp_path / "dvc.lock", content)
    proc = subprocess.run([dvc, "status"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "dvc.lock" in out and what in out and "Traceback" not in out, out
    assert lock.read_bytes() == content

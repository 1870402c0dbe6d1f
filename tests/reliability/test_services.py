"""Services: the MLflow UI (`make ui`) and the Prefect server (`make serve`) listen on 127.0.0.1 only, and a
tracking server that is down (or dies mid-stage) gives one error line, never a lost round: outputs already
written stay valid and a rerun completes."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from oel.artifacts import read_jsonl
from oel.schemas import KnowledgeItem
from tests.conftest import REPO
from tests.reliability.conftest import (
    ARTIFACT_TOPS,
    BIN,
    LOADED,
    Reference,
    env,
    kill_stage,
    ok,
    one_error_line,
    stage,
    tree_hashes,
)

NO_RETRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_command(port: int) -> list[str]:
    """`make ui`'s mlflow command line, read from the Makefile itself (so the test follows it)."""
    text = (REPO / "Makefile").read_text()
    recipe = text[text.index("\nui:"):].split("\n\n")[0]
    line = " ".join(part.strip().rstrip("\\") for part in recipe.splitlines()[2:])
    cmd = line.split("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", 1)[1].split()
    return [str(BIN / "mlflow") if c == ".venv/bin/mlflow" else c.replace("$(MLFLOW_PORT)", str(port)) for c in cmd]


def listening(proc: psutil.Process) -> list[tuple[str, int]]:
    out = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out += [(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


def test_prefect_server_is_started_on_loopback_only():
    import flows.serve as serve

    assert serve.HOST == "127.0.0.1"
    source = Path(serve.__file__).read_text()
    assert '"--host", HOST' in source and "0.0.0.0" not in source
    assert re.search(r"serve:.*\n(?:\t.*\n)*\t\$\(PY\) -m flows.serve --port", (REPO / "Makefile").read_text())


@pytest.mark.slow
def test_mlflow_ui_binds_loopback_and_a_server_dying_mid_stage_loses_no_round(reference: Reference, tmp_path):
    root = reference.seed_project(tmp_path / "p", "extract")
    port = free_port()
    cmd = ui_command(port)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    (root / "mlruns").mkdir(exist_ok=True)
    server = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    try:
        deadline = time.monotonic() + 120
        while not any(port == p for _, p in listening(psutil.Process(server.pid))):
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.2)
        time.sleep(0.5)
        sockets = listening(psutil.Process(server.pid))
        assert sockets and {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets

        # A stage tracking to that server; the server dies as soon as the model is loaded (mid-stage).
        params = root / "params.yaml"
        params.write_text(params.read_text().replace("sqlite:///mlruns/mlflow.db", f"http://127.0.0.1:{port}"))
        import os
        os.environ.update(NO_RETRY)
        try:
            killed = kill_stage(root, "extract", on_stderr=lambda text: _stop(server) if LOADED in text else None,
                                kill=False)
        finally:
            for key in NO_RETRY:
                os.environ.pop(key, None)
    finally:
        _stop(server)
    assert killed.returncode == 2, killed.stderr[-3000:]
    lines = killed.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable")
    assert "Traceback" not in killed.stderr and sum(line.startswith("error:") for line in lines) == 1
    items = root / "data" / "r1" / "knowledge" / "items.jsonl"
    if items.exists():  # whatever was written is whole
        read_jsonl(items, KnowledgeItem)

    # The round is not lost: with tracking back (here the sqlite store), the rerun completes.
    params.write_text(params.read_text().replace(f"http://127.0.0.1:{port}", "sqlite:///mlruns/mlflow.db"))
    ok(stage(root, "extract"))
    assert (root / "data" / "r1" / "knowledge" / "items.jsonl").read_bytes() == \
        (reference.root / "data" / "r1" / "knowledge" / "items.jsonl").read_bytes()


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(timeout=30)
    return "tracking server stopped"


def test_tracking_server_down_at_start_is_one_line_and_touches_nothing(reference: Reference, tmp_path):
    root = reference.seed_project(tmp_path / "p", "distill")
    params = root / "params.yaml"
    good = params.read_text()
    params.write_text(good.replace("sqlite:///mlruns/mlflow.db", f"http://127.0.0.1:{free_port()}"))
    before = tree_hashes(root, *ARTIFACT_TOPS)
    line = one_error_line(stage(root, "consolidate", **NO_RETRY), "is unreachable (Connection refused)")
    assert "tracking.uri" in line
    assert tree_hashes(root, *ARTIFACT_TOPS) == before
    params.write_text(good)
    ok(stage(root, "consolidate"))

"""`oel serve` as a user runs it: the command starts the engine and the gateway on 127.0.0.1, says where to point
an app, answers through the gateway, and on SIGTERM (as on Ctrl-C) stops both servers and forgets its state."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from oel.online import conversation
from tests.conftest import MODEL_CACHE, tiny_params

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bound(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_oel_serve_answers_then_stops_both_servers_on_sigterm(tmp_path: Path, tiny_model_dir):
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "models").symlink_to(MODEL_CACHE)
    port, engine_port = free_port(), free_port()
    raw = tiny_params(serve={"port": port, "engine_port": engine_port, "startup_timeout_s": 300}).model_dump(
        mode="json", by_alias=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    oel = str(Path(sys.executable).with_name("oel"))
    assert subprocess.run([oel, "base"], cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    proc = subprocess.Popen([oel, "serve"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out = Output(proc)
        output = out.until("Ctrl-C stops both", timeout=300)
        assert f"base_url: http://127.0.0.1:{port}/gateway/mlflow/v1" in output, output
        assert "model:    oel" in output and conversation.HEADER in output
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/gateway/mlflow/v1", api_key="unused",
                               max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="oel", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, extra_headers={conversation.HEADER: "e2e-1"})
        assert reply.model == "oel-base"
        assert (tmp_path / ".cache" / "serve" / "stack.json").is_file(), out.text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, out.text()
        assert "stopping: gateway, then engine" in out.text() and "error" not in out.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not bound(port) and not bound(engine_port)  # both servers stopped
    assert not (tmp_path / ".cache" / "serve" / "stack.json").exists()
    shutil.rmtree(tmp_path / ".cache" / "serve", ignore_errors=True)


class Output:
    """The command's output lines as they come (a reader thread: select() cannot see lines a text pipe has
    already buffered)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.proc = proc
        threading.Thread(target=lambda: [self.lines.append(line) for line in proc.stdout], daemon=True).start()

    def until(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(marker in line for line in self.lines):
                return self.text()
            if self.proc.poll() is not None:
                raise AssertionError("oel serve exited early:\n" + self.text())
            time.sleep(0.5)
        raise AssertionError(f"no {marker!r} within {timeout} s:\n" + self.text())

    def text(self) -> str:
        return "".join(self.lines)

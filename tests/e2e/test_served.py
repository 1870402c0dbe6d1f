"""`python -m flows.serve` on an ephemeral 127.0.0.1 port, then the user's command:
`prefect deployment run 'oel-iteration/oel-iteration' --watch` runs a real iteration and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import BIN, clone_env, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def served(clone):
    root = clone({"r1": "base"})
    port = free_port()
    env = clone_env(root)
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--port", str(port)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group: teardown can stop server + runner
    env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    try:
        yield root, env, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # serve.py stops the server it started on KeyboardInterrupt
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def prefect(*args: str, env: dict, root, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_for_deployment(env: dict, root, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if prefect("deployment", "inspect", "oel-iteration/oel-iteration", env=env, root=root).returncode == 0:
            return
        time.sleep(2)
    pytest.fail("deployment oel-iteration/oel-iteration never appeared")


def test_deployment_run_watch_runs_an_iteration(served):
    root, env, proc = served
    wait_for_deployment(env, root, proc)
    # The bare name is not a deployment name in Prefect 3; the docs say so, and so does this.
    assert prefect("deployment", "run", "oel-iteration", env=env, root=root).returncode != 0

    done = prefect("deployment", "run", "oel-iteration/oel-iteration", "--watch", "--watch-interval", "2",
                   env=env, root=root, timeout=480)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Completed" in done.stdout
    assert (root / "reports" / "r1" / "eval.json").is_file()

"""Serve the `oel-iteration` and `oel-loop` deployments from a local Prefect server on 127.0.0.1.

    make serve                      # or: python -m flows.serve --port 4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect deployment run 'oel-iteration/oel-iteration' --watch      # exits 0 when the round completes

Uses the server at PREFECT_API_URL when one answers there; otherwise starts `prefect server start`
on 127.0.0.1 (database under PREFECT_HOME, i.e. <project>/.prefect) and stops it on exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from oel.env import setup_env
from oel.log import setup_logging

log = logging.getLogger("flows.serve")
HOST = "127.0.0.1"  # never exposed beyond this machine unless the user runs their own server


def healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextmanager
def local_server(port: int, startup_timeout: float = 60.0) -> Iterator[str]:
    """Yield the API URL of a healthy server: PREFECT_API_URL's if it answers, else one we start."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured and healthy(configured):
        log.info("using the Prefect server at %s", configured)
        yield configured
        return
    api_url = f"http://{HOST}:{port}/api"
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.Popen([prefect, "server", "start", "--host", HOST, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(api_url, proc, startup_timeout)
        log.info("Prefect server on %s (UI http://%s:%d)", api_url, HOST, port)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_healthy(api_url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; is port {api_url} in use? "
                               f"pass --port or set PREFECT_PORT")
        if time.monotonic() > deadline:
            raise RuntimeError(f"prefect server not healthy at {api_url} after {timeout:.0f}s")
        time.sleep(0.5)


def serve_deployments(params_file: Path) -> None:
    """Block, serving both flows; each triggered run is a fresh subprocess of this process."""
    from prefect import serve

    from flows.oel_iteration import oel_iteration
    from flows.oel_loop import oel_loop

    # An absolute default params_file: the run is correct whatever directory the runner uses.
    defaults = {"params_file": str(params_file)}
    serve(oel_iteration.to_deployment(name="oel-iteration", parameters=defaults),
          # No `rounds` default: each run reads loop.rounds from the params (a paper preset's round count).
          oel_loop.to_deployment(name="oel-loop", parameters=defaults),
          print_starting_message=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the OEL deployments on a local Prefect server.")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", "4200")))
    parser.add_argument("--params", default="params.yaml", help="the project's params.yaml")
    args = parser.parse_args(argv)
    params_file = Path(args.params).resolve()
    setup_env(params_file.parent)
    setup_logging()
    with local_server(args.port) as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # read by prefect when serve() first talks to the API
        log.info("serving. In another shell:\n  export PREFECT_API_URL=%s\n"
                 "  prefect deployment run 'oel-iteration/oel-iteration' --watch", api_url)
        try:
            serve_deployments(params_file)
        except KeyboardInterrupt:
            log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m oel.online.gateway_server`: the MLflow tracking server (UI, REST API, AI Gateway) that `oel serve`
runs, with its app wrapped by oel.online.gateway_app (the conversation id as the trace's session).

`mlflow server` names its ASGI app itself and takes another only from an installed package's `mlflow.app` entry
point, so this starts the same app the way `mlflow server` does with one uvicorn worker: the server's store
settings in the environment, the backend stores initialised (schema migrations included), then uvicorn. One
worker: an endpoint change (a swap) then reaches every request at once, where several workers would each keep
the old routes for up to the gateway's config-cache lifetime. No job runner is started (as `make ui` runs it).
The caller (oel.online.stack) sets the gateway's upstream allowance in the environment (loopback only).
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The MLflow server with the AI Gateway, as `oel serve` runs it.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-store-uri", required=True, help="a database URI (sqlite:///..., postgresql://...)")
    parser.add_argument("--default-artifact-root", default=None)
    args = parser.parse_args(argv)

    from mlflow.server.constants import (
        ARTIFACT_ROOT_ENV_VAR,
        BACKEND_STORE_URI_ENV_VAR,
        REGISTRY_STORE_URI_ENV_VAR,
    )

    os.environ[BACKEND_STORE_URI_ENV_VAR] = args.backend_store_uri
    os.environ[REGISTRY_STORE_URI_ENV_VAR] = args.backend_store_uri
    if args.default_artifact_root:
        os.environ[ARTIFACT_ROOT_ENV_VAR] = args.default_artifact_root

    from mlflow.server.handlers import initialize_backend_stores

    initialize_backend_stores(args.backend_store_uri, args.backend_store_uri, args.default_artifact_root)

    import signal

    import mlflow
    import uvicorn

    from oel.online.gateway_app import app

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler it found. Python's
    # default would end the process without running exit handlers, dropping the traces still queued for writing
    # (measured: 2 of 40 requests answered just before a SIGTERM had no trace). This handler exits normally.
    signal.signal(signal.SIGTERM, _exit)
    try:
        # No access log: under load it is one line per request on a 2-core machine, and every request is a trace.
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        mlflow.flush_trace_async_logging(terminate=True)  # every answered request's trace is written before exit
    return 0


def _exit(signum, frame) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    raise SystemExit(main())

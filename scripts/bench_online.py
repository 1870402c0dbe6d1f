"""Load test of the served stack on loopback: concurrent openai clients for a fixed time, straight to the engine
and through the MLflow AI Gateway, then through the gateway again with a promotion (a swap) half-way.

    .venv/bin/python scripts/bench_online.py                       # 32 clients x 60 s per phase, the tiny model
    .venv/bin/python scripts/bench_online.py --clients 8 --seconds 10 --no-report

Each phase counts failed requests and latency percentiles; the gateway phases also count traces: every answered
request must be one trace in the deployment experiment (in its client's session). The stack runs in a temporary
project (the tiny random model as base, a copy of it as r1), bound to 127.0.0.1, and is stopped at the end.
Appends (or replaces) its section in reports/bench.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Serving: the MLflow AI Gateway vs the engine, under load (`scripts/bench_online.py`)"


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    models: dict[str, int] = field(default_factory=dict)
    traces: int | None = None
    seconds: float = 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def drive(phase: Phase, base_url: str, model: str, clients: int, seconds: float, max_tokens: int,
          conversation_prefix: str | None, midway=None) -> Phase:
    import openai

    lock, stop = threading.Lock(), time.monotonic() + seconds

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=300, max_retries=0)
        headers = {"X-Conversation-Id": f"{conversation_prefix}-{i}"} if conversation_prefix else {}
        turn = 0
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                reply = client.chat.completions.create(
                    model=model, max_tokens=max_tokens, extra_headers=headers,
                    messages=[{"role": "user", "content": f"Client {i}, question {turn}: say something."}])
                with lock:
                    phase.latencies.append(time.monotonic() - t0)
                    phase.models[reply.model] = phase.models.get(reply.model, 0) + 1
            except Exception as err:  # every failure is counted and reported, none is retried
                with lock:
                    phase.failures.append(f"{type(err).__name__}: {str(err)[:120]}")
            turn += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    if midway is not None:
        time.sleep(seconds / 2)
        midway()
    for t in threads:
        t.join()
    phase.seconds += time.monotonic() - started
    return phase


def count_traces(params, prefix: str, expected: int, timeout: float = 120.0) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=params.tracking.uri)
    experiment = client.get_experiment_by_name(params.serve.experiment)
    deadline, found = time.monotonic() + timeout, 0
    while True:
        found, token = 0, None
        while True:
            page = client.search_traces(locations=[experiment.experiment_id], include_spans=False, max_results=500,
                                        filter_string=f"metadata.`mlflow.trace.session` LIKE '{prefix}-%'",
                                        page_token=token)
            found += len(page)
            token = page.token
            if not token:
                break
        if found >= expected or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def make_project(root: Path) -> None:
    from oel.models.embedded import ensure_embedded
    from oel.models.loading import write_policy
    from oel.schemas import PolicyManifest

    cache = REPO / ".cache" / "models"
    tiny = ensure_embedded("tiny-random", cache)
    (root / ".cache").mkdir(parents=True)
    (root / ".cache" / "models").symlink_to(cache)
    write_policy(root / "models" / "base", PolicyManifest(model="tiny-random", round="base"))
    shutil.copytree(tiny, root / "models" / "r1", ignore=shutil.ignore_patterns(".complete"))
    write_policy(root / "models" / "r1", PolicyManifest(merged=True, round="r1"))


def promote_r1(root: Path) -> None:
    from oel.paths import ProjectPaths
    from oel.rounds.records import Decision, write_decision

    write_decision(ProjectPaths(root).round("r1").promotion,
                   Decision(round="r1", **{"from": "base"}, policy="gate", alpha=0.05, champion_before="base",
                            decision="champion", champion_after="r1", reason="bench: a swap under load"))


def row(phase: Phase) -> str:
    answered = len(phase.latencies)
    traces = "—" if phase.traces is None else f"{phase.traces} ({answered - phase.traces} lost)"
    served = ", ".join(f"{m} {n}" for m, n in sorted(phase.models.items()))
    return (f"| {phase.name} | {answered} | {len(phase.failures)} | {answered / phase.seconds:.1f} | "
            f"{1000 * phase.pct(0.5):.0f} | {1000 * phase.pct(0.95):.0f} | {traces} | {served} |")


def report(phases: list[Phase], args, wall: float, load: str) -> str:
    lines = [HEADING, "",
             f"{time.strftime('%Y-%m-%d')}, this machine ({_cpus()} CPUs, shared), the tiny random model "
             f"(`tiny-random`), {args.clients} concurrent clients (threads, the official `openai` client, no "
             f"retries) for {args.seconds:g} s per phase, {args.max_tokens} new tokens per request, everything on "
             f"127.0.0.1: `transformers serve` as the engine, the gateway an MLflow 3.17.2 server with one worker on "
             f"SQLite; direct and gateway alternate in {args.blocks} blocks of {args.seconds / args.blocks:g} s, so "
             f"both see the same load from the rest of the machine; engine threads: "
             f"{args.engine_threads or 'torch default (one per core)'}. Command: `.venv/bin/python "
             f"scripts/bench_online.py --clients {args.clients} --seconds {args.seconds:g}"
             f"{f' --engine-threads {args.engine_threads}' if args.engine_threads else ''}` ({wall / 60:.1f} min in "
             f"all; {load}).", "",
             "| phase | answered | failed | req/s | p50 ms | p95 ms | traces | answered by |",
             "|---|---|---|---|---|---|---|---|", *[row(p) for p in phases], ""]
    failures = [f for p in phases for f in p.failures]
    if failures:
        lines += ["Failures (first 5): " + "; ".join(failures[:5]), ""]
    lines += ["`traces`: the gateway's traces in the deployment experiment whose session is one of the phase's "
              "clients, counted after the phase (traces are written asynchronously); `lost` = answered requests "
              "without one. The swap phase promotes r1 half-way (`oel.online.stack.route`: the engine loads "
              "`oel-r1`, then one endpoint update, in effect once the gateway's 10 s config cache expires); "
              "requests already sent finish on `oel-base`. The engine "
              "generates one request at a time per version, so latency here is mostly queueing behind the other "
              "clients; the gateway's own cost is the difference between the first two rows.", ""]
    return "\n".join(lines)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} at the end, {five:.1f} over 5 min: other work shared the CPUs"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def write_section(text: str, path: Path) -> None:
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if HEADING in old:
        head, _, tail = old.partition(HEADING)
        rest = tail.split("\n## ", 1)
        old = head.rstrip("\n") + "\n\n" + (("## " + rest[1]) if len(rest) > 1 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=3, help="direct and gateway alternate in this many blocks")
    parser.add_argument("--engine-threads", type=int, default=0,
                        help="OMP_NUM_THREADS for the engine (0: inherit, torch's default of one per core)")
    parser.add_argument("--no-report", action="store_true", help="print the section, leave reports/bench.md")
    args = parser.parse_args(argv)

    from oel.config import parse_params
    from oel.env import setup_env
    from oel.online.stack import route, start

    started = time.monotonic()
    if args.engine_threads:  # the engine inherits this process's environment
        os.environ["OMP_NUM_THREADS"] = str(args.engine_threads)
    with tempfile.TemporaryDirectory(prefix="oel-bench-online-") as tmp:
        root = Path(tmp)
        setup_env(root)
        make_project(root)
        params = parse_params({"model": {"name": "tiny-random", "dtype": "float32"},
                               "tracking": {"uri": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"},
                               "serve": {"startup_timeout_s": 600, "port": free_port(),
                                         "engine_port": free_port()}}, "bench")
        run = uuid.uuid4().hex[:8]
        with start(params, root) as stack:
            # Direct and gateway alternate in blocks, so both see the same load from anything else on the machine.
            direct, gateway = Phase("engine, direct"), Phase("through the gateway")
            block = (args.clients, args.seconds / args.blocks, args.max_tokens)
            for _ in range(args.blocks):
                drive(direct, f"{stack.engine}/v1", "oel-base", *block, None)
                drive(gateway, stack.base_url, "oel", *block, f"gw-{run}")
            gateway.traces = count_traces(params, f"gw-{run}", len(gateway.latencies))
            common = (args.clients, args.seconds, args.max_tokens)

            def swap() -> None:
                promote_r1(root)
                print(f"swap: {route(params, root)}", flush=True)

            swapped = drive(Phase("gateway, swap half-way"), stack.base_url, "oel", *common, f"swap-{run}", swap)
            swapped.traces = count_traces(params, f"swap-{run}", len(swapped.latencies))
    text = report([direct, gateway, swapped], args, time.monotonic() - started, _load())
    print(text)
    if not args.no_report:
        write_section(text, REPO / "reports" / "bench.md")
    ok = all(not p.failures for p in (direct, gateway, swapped)) and gateway.traces == len(gateway.latencies) \
        and swapped.traces == len(swapped.latencies)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

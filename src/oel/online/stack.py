"""`oel serve`: the serving engine and the gateway started on this machine, the champion routed, both stopped.

    start   engine (127.0.0.1:serve.engine_port), then the gateway (serve.host:serve.port, an MLflow server with the
            AI Gateway), then the endpoint routed to the champion; .cache/serve/stack.json says what runs
    route   after a promotion or a rollback (the CLI and the flow call it): hold the versions the new routes
            name on the engine first, then change the endpoint's routes in one update, then release versions no
            route names any more, except the one just replaced (a rollback needs no load)
    stop    gateway first (its in-flight requests finish and its traces are written), then the engine

The gateway may reach private addresses only because its one upstream is this machine's loopback engine: the
allowance is set in the gateway's environment alone, after checking that (MLflow 3.17.2 has one switch for every
private address, MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS, not a per-host list).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from oel import tracking
from oel.artifacts import write_json
from oel.config import Params
from oel.models.loading import POLICY_FILE
from oel.online import conversation, lora
from oel.online.engine import (
    HOST,
    LORA_RANKS,
    Command,
    Request,
    ServeError,
    adapter_source,
    clear_versions,
    engine_kind,
    engine_url,
    link_version,
    load_request,
    lora_rank,
    policy_of,
    served_name,
    transformers_command,
    unload_request,
    vllm_command,
)
from oel.online.routes import describe, plan, retired
from oel.paths import ProjectPaths
from oel.rounds.lifecycle import champion

log = logging.getLogger(__name__)

GATEWAY_API = "/gateway/mlflow/v1"  # the gateway's OpenAI-compatible base path; the model is the endpoint's name
# The gateway reads an endpoint's routes through a config cache that the REST update does not clear (the server's
# handlers and its gateway hold two store instances), so a swap takes effect when the entry expires: MLflow's
# shortest lifetime, instead of its default 60 s.
CONFIG_TTL_S = 10


def serve_dir(root: Path) -> Path:
    return ProjectPaths(root).cache / "serve"


def state_file(root: Path) -> Path:
    return serve_dir(root) / "stack.json"


@dataclass
class Stack:
    gateway: str                 # the gateway server's URL
    engine: str                  # the engine's URL (loopback)
    kind: str                    # transformers | vllm
    endpoint: str
    api_key: str                 # what the gateway sends the engine (vLLM checks it; transformers serve ignores it)
    base: str | None = None      # vllm: the base model every served adapter must sit on
    max_lora_rank: int = 0       # vllm: the largest adapter rank the engine takes
    loaded: dict[str, str] = field(default_factory=dict)  # served name -> the folder it was loaded from
    pid: int = 0
    routed_at: float = 0.0       # when the endpoint's routes last changed (time.time())

    @property
    def base_url(self) -> str:
        """What an app passes the openai client."""
        parsed = urlparse(self.gateway)
        host = "127.0.0.1" if parsed.hostname in ("0.0.0.0", "::") else parsed.hostname
        return f"{parsed.scheme}://{host}:{parsed.port}{GATEWAY_API}"


def read_state(root: Path) -> Stack | None:
    path = state_file(root)
    try:
        return Stack(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write_state(root: Path, stack: Stack) -> None:
    path = state_file(root)
    write_json(path, asdict(stack))
    path.chmod(0o600)  # it holds the engine's key


# ---- processes --------------------------------------------------------------------------------------------------

def _http(method: str, url: str, body: dict | None = None, key: str | None = None,
          timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def healthy(url: str, timeout: float = 10.0) -> bool:
    # Generous: a busy server answers late (the gateway decrypts its secrets on the event loop), not never.
    try:
        return _http("GET", f"{url}/health", timeout=timeout)[0] == 200
    except OSError:
        return False


def _check_port(host: str, port: int, key: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ServeError(f"{host}:{port} is taken ({err.strerror}); another `oel serve` or server holds it: "
                             f"stop it or set serve.{key}") from None


@contextlib.contextmanager
def _process(name: str, command: Command, log_path: Path, health: str, timeout: float) -> Iterator[subprocess.Popen]:
    """A server process, healthy before this yields and stopped after (terminate, then kill)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if command.cwd is not None:
        command.cwd.mkdir(parents=True, exist_ok=True)
    shown = {k: ("***" if k in command.secret_env else v) for k, v in command.env.items()}
    log.info("starting the %s: %s %s", name, " ".join(f"{k}={v}" for k, v in shown.items()), " ".join(command.argv))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(command.argv, env={**os.environ, **command.env}, cwd=command.cwd, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_death_signal())
    try:
        _wait_healthy(name, proc, health, log_path, timeout)
        yield proc
    finally:
        _stop(proc)


def _death_signal() -> Callable[[], None] | None:
    """Linux: the server gets SIGTERM when this process dies, so none outlives an `oel serve` (or a test) killed
    without the chance to stop it. prctl is looked up here, in the parent: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_healthy(name: str, proc: subprocess.Popen, url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(url, timeout=2.0):
        if proc.poll() is not None:
            raise ServeError(f"the {name} exited with {proc.returncode} while starting; its log: {log_path} "
                             f"({_last_line(log_path)})")
        if time.monotonic() > deadline:
            raise ServeError(f"the {name} did not answer {url}/health within {timeout:.0f} s (serve.startup_timeout_s);"
                             f" its log: {log_path}")
        time.sleep(0.5)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "empty log"


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- commands ---------------------------------------------------------------------------------------------------

def gateway_command(params: Params, root: Path, upstream: str) -> Command:
    uri = tracking.resolve_uri(params.tracking.uri, root)
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        raise ServeError(f"tracking.uri {params.tracking.uri!r}: the gateway runs in an MLflow server on a database "
                         f"store; set tracking.uri to one (sqlite:///mlruns/mlflow.db is the default)")
    argv = [sys.executable, "-m", "oel.online.gateway_server", "--host", params.serve.host,
            "--port", str(params.serve.port), "--backend-store-uri", uri]
    if uri.startswith("sqlite:///"):
        argv += ["--default-artifact-root", (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()]
    # The gateway keeps the engine's key in the tracking database, encrypted under a key derived from this
    # passphrase; MLflow's default is a published development constant, so anyone with a copy of mlflow.db could
    # read it. A fresh one per start: the engine's key is new every start too, and re-set right after.
    env = {**gateway_env(upstream), "MLFLOW_CRYPTO_KEK_PASSPHRASE": secrets.token_urlsafe(32)}
    return Command(argv, env, secret_env=("MLFLOW_CRYPTO_KEK_PASSPHRASE",))


def gateway_env(upstream: str) -> dict[str, str]:
    """The gateway's upstream allowance, given only for a loopback engine: MLflow refuses private and plain-http
    api_bases by default, and its switch opens every private address, so nothing else may be upstream."""
    host = urlparse(upstream).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ServeError(f"engine address {upstream}: the gateway reaches the engine on loopback only "
                         f"(an IP literal such as 127.0.0.1)")
    return {"MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES": "http,https",
            # The one provider the endpoint uses; no other can be configured on this server.
            "MLFLOW_GATEWAY_ALLOWED_PROVIDERS": tracking.GATEWAY_PROVIDER,
            "MLFLOW_SERVER_SECRETS_CACHE_TTL": str(CONFIG_TTL_S),
            "MLFLOW_DISABLE_TELEMETRY": "true"}


def engine_command(params: Params, root: Path, kind: str, api_key: str) -> tuple[Command, str | None, int]:
    """The engine's command, and (vllm) the base model every served adapter must sit on and the largest adapter
    rank it takes: the champion's, with room for two more stacked rounds."""
    if kind == "transformers":
        from oel.models.loading import compute_dtype

        dtype = compute_dtype(params.model, root)
        name = "auto" if dtype == "auto" else str(dtype).removeprefix("torch.")
        return transformers_command(params, root, name), None, 0
    from oel.models.loading import resolve_spec

    base, adapters = adapter_source(ProjectPaths(root).policy_dir(champion(params, root)))
    base = resolve_spec(base, root)
    r = params.distill.lora.r
    max_rank = lora_rank(min(max(lora.rank(adapters), r) + 2 * r, LORA_RANKS[-1]))
    return vllm_command(params, base, max_rank, api_key), base, max_rank


# ---- versions and routes ----------------------------------------------------------------------------------------

def _source(params: Params, root: Path, stack: Stack, policy: str) -> Path:
    policy_dir = ProjectPaths(root).policy_dir(policy)
    if not (policy_dir / POLICY_FILE).is_file():
        raise ServeError(f"{policy_dir} holds no policy (no {POLICY_FILE}); produce it first (`oel base`, or "
                         f"`dvc repro distill@{policy}`)")
    if stack.kind == "transformers":
        from oel.models.merge import servable_folder

        return _local_folder(servable_folder(str(policy_dir), params.model, root), params)
    return _adapter(params, root, stack, policy, policy_dir)


def _adapter(params: Params, root: Path, stack: Stack, policy: str, policy_dir: Path) -> Path:
    """vLLM: the folder of the policy's one adapter on the engine's base (stacked adapters summed into one)."""
    from oel.models.loading import resolve_spec
    from oel.models.merge import fingerprint

    base, adapters = adapter_source(policy_dir)
    if resolve_spec(base, root) != stack.base:
        raise ServeError(f"{policy} sits on {base}, the engine serves adapters on {stack.base}; restart `oel serve` "
                         f"to serve it")
    if not adapters:
        if policy != "base":
            raise ServeError(f"{policy}'s policy holds no adapter for vLLM to load on {stack.base}; serve it with "
                             f"serve.engine: transformers")
        return Path(stack.base or "")
    if lora.rank(adapters) > stack.max_lora_rank:
        raise ServeError(f"{policy}'s adapters sum to rank {lora.rank(adapters)}, above the {stack.max_lora_rank} the "
                         f"engine was started with; restart `oel serve` (it sizes the engine for the champion)")
    if len(adapters) == 1:
        return adapters[0]
    key = fingerprint(policy_dir, params.model, root)
    return lora.compose(adapters, serve_dir(root) / "adapters" / f"{policy}-{key}", str(stack.base))


def _local_folder(target: str, params: Params) -> Path:
    """A hub id as the folder of its cached snapshot: the engine serves each version from a folder of its own."""
    if Path(target).is_dir():
        return Path(target)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(target, revision=params.model.revision, local_files_only=True))
    except Exception as err:
        raise ServeError(f"model {target!r} is not in the local Hugging Face cache ({type(err).__name__}); load it "
                         f"once (e.g. `oel chat --model {target} hi` with the hub reachable)") from None


def _hold(params: Params, root: Path, stack: Stack, policy: str) -> None:
    """The engine holds the version before any route names it: no request waits for a load or fails."""
    name, source = served_name(policy), _source(params, root, stack, policy)
    source = source.resolve() if source.exists() else source  # a hub id (vLLM's base) stays as it is
    held = stack.loaded.get(name)
    if held is not None and Path(held) != source:
        raise ServeError(f"{name} is served from {held}, and its policy now holds other weights ({source}); restart "
                         f"`oel serve` to serve them (a served name is never reloaded in place)")
    if stack.kind == "transformers":
        link_version(root, name, source)
    elif held is not None:
        return
    request = load_request(stack.kind, name, None if policy == "base" else source)
    if request is not None:
        _call(stack, request, params.serve.startup_timeout_s)
    stack.loaded[name] = str(source)


def _release(stack: Stack, policy: str) -> None:
    request = unload_request(stack.kind, served_name(policy))
    if request is None:
        return  # transformers serve drops it once idle (serve.unload_idle_s)
    _call(stack, request, 60)
    stack.loaded.pop(served_name(policy), None)


def _call(stack: Stack, request: Request, timeout: float) -> None:
    status, body = _http(request.method, stack.engine + request.path, request.body, stack.api_key, timeout)
    text = body.decode(errors="replace")
    if status != 200:
        raise ServeError(f"the engine refused {request.method} {request.path} {request.body}: HTTP {status} "
                         f"{text.strip()[:200]}")
    for line in text.splitlines():  # transformers serve's /load_model streams its progress as events
        if line.startswith("data:"):
            event = json.loads(line.removeprefix("data:"))
            if event.get("status") == "error":
                raise ServeError(f"the engine could not load {request.body}: {event.get('message', '')[:200]}")


def _apply(params: Params, root: Path, stack: Stack, full: bool) -> dict[str, float]:
    serve = params.serve
    current = {policy_of(n): s for n, s in tracking.gateway_routes(stack.gateway, serve.endpoint).items()}
    wanted = plan(champion(params, root), current, serve.canary, full)
    for policy in wanted:
        _hold(params, root, stack, policy)
    # What the endpoint routed to before may still be routed to from the gateway's cache: only once the previous
    # change has settled is a version neither routed now nor just before unloaded (else the next change does it).
    settled = time.time() - stack.routed_at > CONFIG_TTL_S
    tracking.set_gateway_routes(stack.gateway, serve.endpoint, serve.experiment, f"{stack.engine}/v1", stack.api_key,
                                {served_name(p): share for p, share in wanted.items()})
    if wanted != current:
        stack.routed_at = time.time()
    for policy in retired([policy_of(n) for n in stack.loaded], current, wanted) if settled else []:
        _release(stack, policy)
    _write_state(root, stack)
    log.info("gateway %s: %s", serve.endpoint, describe(wanted, served_name))
    return wanted


def route(params: Params, root: Path, full: bool = False) -> dict[str, float] | None:
    """Point a running gateway where the decision files say (None when `oel serve` is not running here)."""
    root = Path(root).resolve()
    stack = read_state(root)
    if stack is None or not healthy(stack.gateway):
        return None
    return _apply(params, root, stack, full)


# ---- the stack --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def start(params: Params, root: Path) -> Iterator[Stack]:
    """Engine and gateway up, the champion routed; both stopped on exit, whatever happens."""
    root = Path(root).resolve()
    serve = params.serve
    running = read_state(root)
    if running is not None and healthy(running.gateway):
        raise ServeError(f"`oel serve` already runs for this project (gateway {running.gateway}); stop it first")
    _check_port(HOST, serve.engine_port, "engine_port")
    _check_port(serve.host, serve.port, "port")
    kind = engine_kind(params)
    api_key = secrets.token_urlsafe(24)
    engine, base, max_rank = engine_command(params, root, kind, api_key)
    upstream = engine_url(params)
    gateway = gateway_command(params, root, upstream)
    clear_versions(root)
    logs = serve_dir(root)
    with contextlib.ExitStack() as processes:
        running = {"engine": processes.enter_context(
            _process("engine", engine, logs / "engine.log", upstream, serve.startup_timeout_s))}
        gateway_url = f"http://{serve.host if ':' not in serve.host else f'[{serve.host}]'}:{serve.port}"
        running["gateway"] = processes.enter_context(
            _process("gateway", gateway, logs / "gateway.log", gateway_url, serve.startup_timeout_s))
        stack = Stack(gateway=gateway_url, engine=upstream, kind=kind, endpoint=serve.endpoint, api_key=api_key,
                      base=base, max_lora_rank=max_rank, pid=os.getpid())
        stack.processes = running  # not a field: the state file holds addresses, not processes
        try:
            _apply(params, root, stack, full=True)
            yield stack
        finally:
            state_file(root).unlink(missing_ok=True)


def run(params: Params, root: Path, echo: Callable[[str], None]) -> None:
    """`oel serve`: serve until Ctrl-C or SIGTERM (or until the engine or the gateway stops on its own)."""
    import signal

    # SIGTERM unwinds like Ctrl-C, so both servers are stopped in order rather than left running.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _serve_until_stopped(params, root, echo)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    import signal

    # One stop at a time: a second SIGTERM (`timeout` signals the command and then its group) must not cut the
    # servers' shutdown short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _serve_until_stopped(params: Params, root: Path, echo: Callable[[str], None]) -> None:
    with start(params, root) as stack:
        routes = tracking.gateway_routes(stack.gateway, stack.endpoint)
        echo(f"serving {describe(routes)} ({stack.kind} engine) behind the MLflow AI Gateway\n"
             f"  base_url: {stack.base_url}\n  model:    {stack.endpoint}\n"
             f"  header:   {conversation.HEADER}: <the conversation's id>\n"
             f"  traces:   experiment {params.serve.experiment!r} (UI: {stack.gateway})\n"
             f"Ctrl-C stops both (logs in {serve_dir(Path(root))})")
        try:
            stopped = _watch(stack)
        except KeyboardInterrupt:
            echo("stopping: gateway, then engine")
            return
        raise ServeError(f"the {stopped}; its log is {serve_dir(Path(root)) / (stopped.split()[0] + '.log')}")


def _watch(stack: Stack, patience: float = 60.0) -> str:
    """Block while both servers run; say which stopped: its process exited, or it has not answered for `patience`
    seconds (a busy server answers late, so one slow health check is no reason to stop serving)."""
    urls = {"engine": stack.engine, "gateway": stack.gateway}
    answered = dict.fromkeys(urls, time.monotonic())
    while True:
        for name, proc in stack.processes.items():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}"
            if healthy(urls[name]):
                answered[name] = time.monotonic()
            elif time.monotonic() - answered[name] > patience:
                return f"{name} has not answered /health for {patience:.0f} s"
        time.sleep(5.0)

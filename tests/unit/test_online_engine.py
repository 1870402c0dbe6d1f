"""The serving engines' commands and requests, the versioned names, and the routes after each decision: no server
runs here (tests/integration/test_online_stack.py runs the real stack)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oel.models.loading import write_policy
from oel.online import conversation, routes
from oel.online.engine import (
    ServeError,
    adapter_source,
    clear_versions,
    engine_kind,
    link_version,
    load_request,
    lora_rank,
    policy_of,
    served_name,
    transformers_command,
    unload_request,
    versions_dir,
    vllm_command,
)
from oel.online.stack import Stack, gateway_command, gateway_env
from oel.schemas import PolicyManifest
from tests.conftest import tiny_params


def test_every_policy_has_a_versioned_name():
    assert served_name("base") == "oel-base"
    assert served_name("r3") == "oel-r3"
    assert policy_of(served_name("r12")) == "r12"


def test_the_engine_follows_the_generation_backend_unless_named():
    assert engine_kind(tiny_params()) == "transformers"
    assert engine_kind(tiny_params(generation={"backend": "vllm"})) == "vllm"
    assert engine_kind(tiny_params(generation={"backend": "vllm"}, serve={"engine": "transformers"})) == "transformers"


def test_vllm_serves_the_base_with_runtime_lora_on_loopback_and_a_key():
    params = tiny_params(serve={"engine_port": 8123, "max_loras": 3},
                         generation={"backend": "vllm", "gpu_memory_utilization": 0.5, "max_model_len": 4096})
    cmd = vllm_command(params, "/models/qwen3", lora_rank(16), "k3y")
    argv = cmd.argv
    assert Path(argv[0]).name == "vllm" and argv[1:3] == ["serve", "/models/qwen3"]
    flag = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    assert flag["--host"] == "127.0.0.1" and flag["--port"] == "8123"
    assert flag["--served-model-name"] == "oel-base"
    assert "--enable-lora" in argv
    assert flag["--max-loras"] == "3" and flag["--max-lora-rank"] == "16"
    assert flag["--gpu-memory-utilization"] == "0.5" and flag["--max-model-len"] == "4096"
    assert cmd.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert cmd.env["VLLM_API_KEY"] == "k3y" and "k3y" not in argv  # never on a command line `ps` shows
    assert cmd.secret_env == ("VLLM_API_KEY",)


def test_lora_rank_is_the_smallest_rank_vllm_accepts():
    assert [lora_rank(r) for r in (1, 2, 8, 9, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]
    with pytest.raises(ServeError, match="above vLLM's largest"):
        lora_rank(513)


def test_each_round_loads_under_its_own_name_and_is_never_loaded_in_place():
    load = load_request("vllm", "oel-r3", Path("/p/models/r3/adapter"))
    assert (load.method, load.path) == ("POST", "/v1/load_lora_adapter")
    assert load.body == {"lora_name": "oel-r3", "lora_path": "/p/models/r3/adapter"}
    assert "load_inplace" not in load.body
    assert unload_request("vllm", "oel-r1").body == {"lora_name": "oel-r1"}
    assert load_request("vllm", "oel-base", None) is None  # served from the start
    assert unload_request("vllm", "oel-base") is None
    assert load_request("transformers", "oel-r3", Path("/x")).body == {"model": "oel-r3"}
    assert unload_request("transformers", "oel-r3") is None  # idle versions unload themselves


def test_transformers_serve_runs_in_the_versions_folder(tmp_path: Path):
    cmd = transformers_command(tiny_params(serve={"engine_port": 8124, "unload_idle_s": 60}), tmp_path, "float32")
    assert cmd.argv[1] == "serve" and cmd.cwd == versions_dir(tmp_path)
    assert cmd.argv[cmd.argv.index("--host") + 1] == "127.0.0.1"
    assert cmd.argv[cmd.argv.index("--model-timeout") + 1] == "60"
    assert cmd.argv[cmd.argv.index("--dtype") + 1] == "float32"


def _policy(models: Path, name: str, **manifest) -> Path:
    folder = models / name
    folder.mkdir(parents=True)
    if manifest.get("adapter"):
        (folder / manifest["adapter"]).mkdir()
        (folder / manifest["adapter"] / "adapter_config.json").write_text("{}")
    write_policy(folder, PolicyManifest(round=name, **manifest))
    return folder


def test_vllm_gets_the_base_and_the_adapters_of_the_chain_newest_first(tmp_path: Path):
    models = tmp_path / "models"
    base = _policy(models, "base", model="tiny-random")
    r1 = _policy(models, "r1", parent="../base", adapter="adapter")
    r2 = _policy(models, "r2", parent="../r1", adapter="adapter")
    assert adapter_source(base) == ("tiny-random", [])
    assert adapter_source(r1) == ("tiny-random", [r1 / "adapter"])
    assert adapter_source(r2) == ("tiny-random", [r2 / "adapter", r1 / "adapter"])


def test_a_served_name_keeps_its_weights(tmp_path: Path):
    first, second = tmp_path / "merged-a", tmp_path / "merged-b"
    first.mkdir()
    second.mkdir()
    link = link_version(tmp_path, "oel-r1", first)
    assert link_version(tmp_path, "oel-r1", first) == link  # the same weights again: nothing changes
    with pytest.raises(ServeError, match="never reloaded in place"):
        link_version(tmp_path, "oel-r1", second)
    clear_versions(tmp_path)  # a fresh engine: the name may be made again, from other weights
    assert link_version(tmp_path, "oel-r1", second) == link


def test_a_served_version_samples_when_asked_and_its_policy_is_untouched(tmp_path: Path):
    """transformers serve only turns sampling off (temperature 0): the served copy's generation config has it on,
    the policy's own config and weights stay as they are."""
    policy = tmp_path / "merged"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights")
    own = {"do_sample": False, "eos_token_id": 2, "max_new_tokens": 64}
    (policy / "generation_config.json").write_text(json.dumps(own))
    version = link_version(tmp_path, "oel-r1", policy)
    assert json.loads((version / "generation_config.json").read_text()) == {**own, "do_sample": True}
    assert (version / "model.safetensors").resolve() == (policy / "model.safetensors").resolve()
    assert json.loads((policy / "generation_config.json").read_text()) == own
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "generation_config.json").write_text("{not json")
    with pytest.raises(ServeError, match="not a readable generation config"):
        link_version(tmp_path, "oel-r2", broken)
    assert not (versions_dir(tmp_path) / "oel-r2").exists()


def test_the_gateway_may_reach_a_loopback_engine_only():
    env = gateway_env("http://127.0.0.1:8001")
    assert env["MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS"] == "true"
    assert env["MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES"] == "http,https"
    assert env["MLFLOW_GATEWAY_ALLOWED_PROVIDERS"] == "openai"
    for upstream in ("http://10.0.0.5:8001", "http://169.254.169.254", "http://engine.internal:8001"):
        with pytest.raises(ServeError, match="loopback only"):
            gateway_env(upstream)


def test_the_gateway_runs_on_the_projects_database_store(tmp_path: Path):
    cmd = gateway_command(tiny_params(), tmp_path, "http://127.0.0.1:8001")
    uri = cmd.argv[cmd.argv.index("--backend-store-uri") + 1]
    assert uri == f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').resolve()}"
    assert cmd.argv[cmd.argv.index("--host") + 1] == "127.0.0.1"
    # The engine's key is stored encrypted under a passphrase of this start's own, never logged.
    again = gateway_command(tiny_params(), tmp_path, "http://127.0.0.1:8001")
    passphrase = cmd.env["MLFLOW_CRYPTO_KEK_PASSPHRASE"]
    assert len(passphrase) >= 32 and passphrase != again.env["MLFLOW_CRYPTO_KEK_PASSPHRASE"]
    assert "MLFLOW_CRYPTO_KEK_PASSPHRASE" in cmd.secret_env
    with pytest.raises(ServeError, match="database store"):
        gateway_command(tiny_params(tracking={"uri": "http://127.0.0.1:5000"}), tmp_path, "http://127.0.0.1:8001")


def test_apps_get_a_loopback_base_url_even_when_the_gateway_binds_every_address():
    stack = Stack(gateway="http://0.0.0.0:5001", engine="http://127.0.0.1:8001", kind="transformers",
                  endpoint="oel", api_key="k")
    assert stack.base_url == "http://127.0.0.1:5001/gateway/mlflow/v1"


@pytest.mark.parametrize(("current", "canary", "full", "expected"), [
    ({}, 0.1, False, {"r1": 1.0}),                                  # a fresh gateway: the champion alone
    ({"base": 1.0}, 0.0, False, {"r1": 1.0}),                       # no canary: every request at once
    ({"base": 1.0}, 0.1, False, {"r1": 0.1, "base": 0.9}),          # a canary share first
    ({"r1": 0.1, "base": 0.9}, 0.1, False, {"r1": 0.1, "base": 0.9}),  # a running canary stays
    ({"r1": 0.1, "base": 0.9}, 0.1, True, {"r1": 1.0}),             # --full ends it
    ({"r1": 1.0}, 0.25, False, {"r1": 1.0}),                        # routed already: unchanged
])
def test_routes_follow_the_champion(current, canary, full, expected):
    assert routes.plan("r1", current, canary, full) == expected


def test_a_rollback_routes_everything_back_and_a_kept_back_round_never_appears():
    # r2 was champion with a canary over r1; the gate kept r3 back; a rollback makes r1 champion again.
    after = routes.plan("r1", {"r2": 0.2, "r1": 0.8}, 0.2, full=True)
    assert after == {"r1": 1.0}
    assert "r3" not in routes.plan("r2", {"r1": 1.0}, 0.2)


def test_the_replaced_version_stays_loaded_for_a_rollback():
    assert routes.retired(["base", "r1", "r2"], {"r1": 1.0}, {"r2": 1.0}) == ["base"]
    assert routes.describe({"r2": 0.1, "r1": 0.9}, served_name) == "oel-r1 90%, oel-r2 10%"


@pytest.mark.parametrize(("value", "ok"), [
    ("3f2b8c1e-7d4a-4f7e-9c1a-2b3c4d5e6f70", True), ("user@example.com/thread:42", True),
    ("", False), ("a b", False), ("x' OR '1'='1", False), ("a" * 251, False), ("a" * 250, True),
])
def test_a_conversation_id_is_a_safe_session_id(value, ok):
    assert (conversation.check(value) is None) == ok


def test_vllm_serves_a_stacked_round_as_one_summed_adapter_within_the_engines_rank(tmp_path: Path, monkeypatch):
    import oel.models.merge  # noqa: F401  imported before the patch below, or it would keep the patched resolve_spec
    from oel.online import lora, stack

    models = tmp_path / "models"
    _policy(models, "base", model="tiny-random")
    r1 = _policy(models, "r1", parent="../base", adapter="adapter")
    r2 = _policy(models, "r2", parent="../r1", adapter="adapter")
    for folder in (r1, r2):
        (folder / "adapter" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    summed = []
    monkeypatch.setattr(lora, "compose", lambda adapters, out, base: summed.append((adapters, out, base)) or out)
    monkeypatch.setattr("oel.models.loading.resolve_spec", lambda spec, root: f"/weights/{spec}")
    monkeypatch.setattr("oel.models.merge.fingerprint", lambda path, cfg, root: "f1")
    engine = Stack(gateway="http://127.0.0.1:1", engine="http://127.0.0.1:2", kind="vllm", endpoint="oel",
                   api_key="k", base="/weights/tiny-random", max_lora_rank=32)
    params = tiny_params()
    assert stack._source(params, tmp_path, engine, "r1") == r1 / "adapter"
    out = stack._source(params, tmp_path, engine, "r2")
    assert summed == [([r2 / "adapter", r1 / "adapter"], out, "/weights/tiny-random")]
    assert out.name == "r2-f1"
    small = Stack(**{**engine.__dict__, "max_lora_rank": 16})
    with pytest.raises(ServeError, match="sum to rank 32, above the 16 the engine was started with"):
        stack._source(params, tmp_path, small, "r2")


class _Proc:
    def __init__(self, code=None):
        self.returncode = code

    def poll(self):
        return self.returncode


def test_serving_stops_when_a_server_exits_not_when_it_answers_late(monkeypatch):
    from oel.online import stack

    engine = Stack(gateway="http://127.0.0.1:1", engine="http://127.0.0.1:2", kind="transformers", endpoint="oel",
                   api_key="k")
    monkeypatch.setattr(stack.time, "sleep", lambda s: None)
    answers = iter([False] * 5 + [True] * 5)  # the gateway is slow for a while, then answers again
    monkeypatch.setattr(stack, "healthy", lambda url, timeout=10.0: url.endswith(":2") or next(answers, True))
    calls = {"n": 0}

    def gateway_poll():
        calls["n"] += 1
        if calls["n"] > 12:  # ... and exits later
            gateway.returncode = 1
        return gateway.returncode

    gateway = _Proc()
    gateway.poll = gateway_poll
    engine.processes = {"engine": _Proc(), "gateway": gateway}
    assert stack._watch(engine, patience=60.0) == "gateway exited with 1"


def test_serving_stops_when_a_server_is_silent_past_its_patience(monkeypatch):
    from oel.online import stack

    engine = Stack(gateway="http://127.0.0.1:1", engine="http://127.0.0.1:2", kind="transformers", endpoint="oel",
                   api_key="k")
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(stack.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(stack.time, "sleep", lambda s: None)
    monkeypatch.setattr(stack, "healthy", lambda url, timeout=10.0: url.endswith(":1"))
    engine.processes = {"engine": _Proc(), "gateway": _Proc()}
    assert stack._watch(engine, patience=60.0) == "engine has not answered /health for 60 s"

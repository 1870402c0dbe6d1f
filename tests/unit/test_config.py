from pathlib import Path

import pytest
from pydantic import ValidationError

from oel.config import Params, ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_shipped_params_validate():
    p = load_params(REPO / "params.yaml")
    assert p.model.name == "smollm2-135m-instruct"
    assert list(p.rounds) and p.policy_of(next(iter(p.rounds))) == "base"


def test_params_are_frozen():
    p = Params()
    with pytest.raises(ValidationError):
        p.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"model": {"nme": "x"}}, "model.nme: unknown key"),
        ({"distill": {"steps": "many"}}, "distill.steps"),
        ({"distill": {"learning_rate": -1}}, "distill.learning_rate"),
        ({"collect": {"episodes_per_game": 0}}, "collect.episodes_per_game"),
        ({"extract": {"max_knowledge_tokens": 10, "max_item_tokens": 50}}, "smaller than one item"),
        ({"rounds": {"r1": {"from": "r2"}, "r2": {"from": "r1"}}}, "cycle"),
        ({"rounds": {"r1": {"from": "r7"}}}, "undeclared round"),
        ({"rounds": {"x1": {"from": "base"}}}, "must look like r1"),
        ({"games": {"frozenlake": {"size": 3, "num_holes": 8}}}, "no safe path"),
        ({"profile": "tpu"}, "profile"),
        ({"distill": {"use_vllm": True}}, "distill: use_vllm moved to the one generation setting"),
        ({"generation": {"backend": "sglang"}}, "generation.backend"),
        ({"generation": {"gpu_memory_utilization": 1.5}}, "generation.gpu_memory_utilization"),
        ([1, 2], "top level must be a mapping"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(raw, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(raw, "bad.yaml")
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and msg.startswith("bad.yaml")


def test_gpu_profile_fills_only_unset_keys():
    p = parse_params({"profile": "gpu", "distill": {"steps": 7}})
    assert p.distill.steps == 7            # the user's value wins
    assert p.distill.learning_rate == 1e-6  # the profile's value fills the rest
    assert p.collect.episodes_per_game == 128 * 10  # 128 games per consolidation step


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_undeclared_round_is_a_params_error():
    with pytest.raises(ParamsError, match="not declared"):
        Params().policy_of("r9")


def test_a_partial_nested_section_keeps_its_fields_own_defaults():
    # eval.sampling defaults to (0.7, 0.8, 20); setting one key must not fall back to the class's (1.0, 0).
    p = parse_params({"eval": {"sampling": {"max_new_tokens": 64}}})
    s = p.eval.sampling
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (0.7, 0.8, 20, 64)
    assert list(parse_params({"rounds": {"r2": {"from": "base"}}}).rounds) == ["r2"]  # rounds are not merged


def test_a_params_file_nested_past_the_parser_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ParamsError, match="nested too deeply"):
        load_params(path)

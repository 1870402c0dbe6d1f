"""Profiles apply: the shipped params.yaml leaves them room, the paper presets carry the reference's
values (shared/research/oel-paper.md §3), and `oel params` says where every resolved key comes from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from oel.cli import app
from oel.config import ParamsError, parse_params, profiles
from oel.provenance import resolve
from oel.tracking import STAGE_SECTIONS

REPO = Path(__file__).resolve().parents[2]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())

# The reference's four configurations (LMOps oel/usage_example.sh), one row each:
# model, thinking, game, prompt version, previous knowledge, extraction steps used (T_use),
# experience_max_length, learning rate, consolidation steps (= deployment steps), rounds.
PAPER = {
    "paper-sokoban-qwen3-4b": ("Qwen/Qwen3-4B-Instruct-2507", False, "sokoban", "v4", True, 50, 8192, 1e-6, 100, 3),
    "paper-frozenlake-qwen3-1_7b": ("Qwen/Qwen3-1.7B", True, "frozenlake", "v3", False, 15, 2048, 5e-6, 20, 2),
    "paper-frozenlake-qwen3-4b": ("Qwen/Qwen3-4B", True, "frozenlake", "v4", True, 25, 8192, 1e-6, 20, 2),
    "paper-frozenlake-qwen3-8b": ("Qwen/Qwen3-8B", True, "frozenlake", "v4", True, 50, 8192, 1e-6, 100, 2),
}


def shipped_with(profile: str) -> dict:
    return {**SHIPPED, "profile": profile}


@pytest.mark.parametrize("name", [n for n in profiles() if n != "cpu"])
def test_flipping_the_shipped_profile_changes_the_run(name):
    default, flipped = parse_params(SHIPPED), parse_params(shipped_with(name))
    assert flipped.profile == name
    for section in ("model", "collect", "extract", "distill", "eval"):
        assert getattr(flipped, section) != getattr(default, section), section


@pytest.mark.parametrize("name", list(profiles()))
def test_the_shipped_file_overrides_no_profile_key(name):
    assert [e.key for e in resolve(shipped_with(name)) if e.source == "override"] == []


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets_carry_the_reference_values(name):
    model, thinking, game, version, with_prev, steps, max_len, lr, consolidation_steps, rounds = PAPER[name]
    p = parse_params(shipped_with(name))
    assert (p.model.name, p.model.thinking, p.model.dtype) == (model, thinking, "bfloat16")
    assert p.games.enabled() == [game]
    assert getattr(p.games, game).max_calls == 5
    x = p.extract
    assert (x.prompt_version, x.with_previous, x.steps, x.stores, x.max_knowledge_tokens) == (
        version, with_prev, steps, 10, max_len)
    assert x.sampling.max_new_tokens == max_len and not x.prefill_marker and x.extractor == "policy"
    d = p.distill
    assert (d.learning_rate, d.steps, d.method, d.schedule, d.mode) == (lr, consolidation_steps, "full", "once",
                                                                         "on_policy")
    assert (d.top_k, d.kl_temperature, d.max_grad_norm, d.weight_decay, d.save_every) == (256, 0.7, 1.0, 0.01, 2)
    # 128 deployment games per consolidation step; every store plays its own extraction games.
    assert p.collect.episodes_per_game == 128 * consolidation_steps
    assert p.collect.extraction_episodes_per_game == x.stores * x.steps
    assert p.eval.episodes_per_game == 128
    assert p.loop.rounds == rounds
    assert not p.consolidate.dedupe


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets_use_the_two_sampling_regimes(name):
    p = parse_params(shipped_with(name))
    deploy = (0.7, 1.0, 0, 1024)
    validate = (0.7, 0.8, 20, 1024)
    key = lambda s: (s.temperature, s.top_p, s.top_k, s.max_new_tokens)  # noqa: E731
    assert key(p.collect.sampling) == key(p.distill.sampling) == deploy
    assert key(p.collect.extraction_sampling) == key(p.eval.sampling) == validate
    assert key(p.extract.sampling)[:3] == validate[:3]


@pytest.mark.parametrize("name", list(profiles()))
def test_every_profile_names_every_tracked_section(name):
    # dvc.yaml tracks `<profile>.<section>` of profiles.yaml: a missing section or a dot in the name
    # would make `dvc repro` fail for that profile.
    body = profiles()[name]
    sections = {s for secs in STAGE_SECTIONS.values() for s in secs} - {"profile", "seed"}
    assert sections <= set(body), sections - set(body)
    assert "." not in name
    parse_params({"profile": name})


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ParamsError) as err:
        parse_params({"profile": "paper-sokoban"}, "params.yaml")
    msg = str(err.value)
    assert "\n" not in msg and all(name in msg for name in profiles())


def test_sources_of_every_key():
    raw = {"profile": "paper-frozenlake-qwen3-4b", "distill": {"learning_rate": 2e-6}, "seed": 7}
    by_key = {e.key: e for e in resolve(raw)}
    assert by_key["seed"].source == "file"
    assert by_key["distill.learning_rate"].source == "override"
    assert by_key["distill.learning_rate"].value == 2e-6 and by_key["distill.learning_rate"].profile_value == 1e-6
    assert by_key["distill.steps"].source == "profile"
    assert by_key["distill.kl_temperature"].source == "profile"
    assert by_key["distill.lora.r"].source == "default"
    assert parse_params(raw).distill.learning_rate == 2e-6  # overriding a preset is allowed


def test_oel_params_prints_every_key_with_its_source(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({**SHIPPED, "profile": "paper-sokoban-qwen3-4b", "distill": {"steps": 3}}))
    out = CliRunner().invoke(app, ["params", "--params", str(f)])
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line for line in out.output.splitlines()[1:]}
    assert lines["distill.steps"].split()[1:3] == ["3", "override"] and "(profile: 100)" in lines["distill.steps"]
    assert lines["model.name"].split()[1:] == ['"Qwen/Qwen3-4B-Instruct-2507"', "profile"]
    assert lines["distill.lora.alpha"].split()[2] == "default"
    assert lines["rounds.r1.from"].split()[2] == "file"


def test_oel_params_bad_profile_is_one_error_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("profile: nope\n")
    out = CliRunner().invoke(app, ["params", "--params", str(f)])
    assert out.exit_code == 2
    assert out.output.strip().startswith("error:") and len(out.output.strip().splitlines()) == 1

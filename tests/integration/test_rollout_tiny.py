"""TransformersBackend and the collect stage on the tiny random model (real tokenizer, real games)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from oel.artifacts import read_jsonl
from oel.config import SamplingParams
from oel.prompts import play_context, render_play
from oel.rollout import TransformersBackend
from oel.schemas import Episode

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
HEADER = "You are an agent playing a game on a grid, acting as a reasoning engine."


def prompts(n: int) -> list:
    # Different lengths on purpose: left padding must not change any row's result.
    return [render_play(play_context(HEADER, "[GAME] board " + "row " * (3 * i), "Which move?"))
            for i in range(n)]


def _top2_gap(loaded, backend, prompt, prefix: list[int]) -> float:
    import torch

    ids = loaded.tokenizer(backend.prompt_text(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.tensor([prefix], dtype=ids.dtype)], dim=1)
    with torch.inference_mode():
        logits = loaded.model(ids).logits[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def test_greedy_batched_equals_one_at_a_time_up_to_logit_ties(tiny_model):
    backend = TransformersBackend(tiny_model)
    batch = prompts(5)
    together = backend.generate(batch, GREEDY)
    for prompt, got in zip(batch, together, strict=True):
        [alone] = backend.generate([prompt], GREEDY)
        if got == alone:
            continue
        # Only a near-tie may flip: find the first differing token and check its logit gap is float noise.
        a = tiny_model.tokenizer(alone.text, add_special_tokens=False)["input_ids"]
        b = tiny_model.tokenizer(got.text, add_special_tokens=False)["input_ids"]
        k = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
        assert _top2_gap(tiny_model, backend, prompt, a[:k]) < 1e-4, (alone, got)


def test_left_padding_changes_no_logits_beyond_float_noise(tiny_model):
    # The random tiny model's greedy text is mostly newlines, so compare what decides it: every
    # decoding step's logits, batched (left-padded) against alone, through the backend's own encoding.
    import torch

    backend = TransformersBackend(tiny_model, fixed_length=True)
    kw = {**backend.generate_kwargs(GREEDY), "output_logits": True, "return_dict_in_generate": True}
    batch = prompts(4)
    enc = backend.encode(batch)
    assert (enc["attention_mask"][:, 0] == 0).any() and (enc["attention_mask"][:, -1] == 1).all()
    with torch.inference_mode():
        together = tiny_model.model.generate(**enc, **kw)
        for row, prompt in enumerate(batch):
            alone = tiny_model.model.generate(**backend.encode([prompt]), **kw)
            width = enc["input_ids"].shape[1]
            assert together.sequences[row, width:].tolist() == alone.sequences[0, -GREEDY.max_new_tokens:].tolist()
            for step_t, step_a in zip(together.logits, alone.logits, strict=True):
                assert torch.allclose(step_t[row], step_a[0], atol=1e-4), (row, (step_t[row] - step_a[0]).abs().max())


def test_token_counts_include_eos_and_stop_at_max(tiny_model):
    backend = TransformersBackend(tiny_model)
    for gen in backend.generate(prompts(3), GREEDY):
        assert 1 <= gen.n_tokens <= GREEDY.max_new_tokens
    fixed = TransformersBackend(tiny_model, fixed_length=True)
    assert all(g.n_tokens == GREEDY.max_new_tokens for g in fixed.generate(prompts(3), GREEDY))
    assert backend.count_tokens("hello world") == 2


def test_sampling_is_reproducible_by_seed_and_leaves_global_rng_alone(tiny_model):
    import torch

    backend = TransformersBackend(tiny_model)
    hot = SamplingParams(temperature=1.5, top_p=0.95, top_k=50, max_new_tokens=12)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = backend.generate(prompts(3), hot, seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the backend forked the RNG
    assert backend.generate(prompts(3), hot, seed=5) == a
    assert any(x != y for x, y in zip(backend.generate(prompts(3), hot, seed=6), a, strict=True))


def test_thinking_flag_reaches_the_chat_template(tiny_model):
    from oel.schemas import Message

    seen = {}
    tok = tiny_model.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def apply_chat_template(self, *a, **k):
            seen.update(k)
            return tok.apply_chat_template(*a, **k)

    backend = TransformersBackend(tiny_model, thinking=True)
    backend.tokenizer = Spy()
    backend.prompt_text([Message(role="user", content="hi")])
    assert seen["enable_thinking"] is True


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="vLLM not installed")
def test_vllm_backend_generates(tiny_model_dir):  # pragma: no cover - GPU machines only
    from oel.rollout import VLLMBackend

    backend = VLLMBackend(tiny_model_dir, gpu_memory_utilization=0.3)
    gens = backend.generate(prompts(2), GREEDY, seed=0)
    assert len(gens) == 2 and all(1 <= g.n_tokens <= GREEDY.max_new_tokens for g in gens)


def test_oel_collect_writes_valid_trajectories_for_every_enabled_game(project, tiny_model_dir):
    from oel.cli import app
    from oel.stages.collect import trajectory_schema

    # TextWorld is covered by its own test below: game generation is the slow part.
    (project / "params.yaml").write_text(yaml.safe_dump({
        "model": {"name": "tiny-random"}, "games": {"sokoban": {"enabled": True}, "textworld": {"enabled": False}},
        "collect": {"episodes_per_game": 3, "extraction_episodes_per_game": 1, "batch_size": 4,
                    "sampling": {"max_new_tokens": 6}, "extraction_sampling": {"top_p": 0.8, "top_k": 20, "max_new_tokens": 5}},
        "tracking": {"uri": f"sqlite:///{project}/mlruns/mlflow.db"}}))
    result = CliRunner().invoke(app, ["collect", "--round", "r1"])
    assert result.exit_code == 0, result.output
    path = project / "data" / "r1" / "trajectories.jsonl"
    episodes = read_jsonl(path, Episode)
    assert {e.game for e in episodes} == {"frozenlake", "sokoban"}
    assert sorted(e.split for e in episodes if e.game == "sokoban") == ["extract", "user", "user", "user"]
    assert all(e.round == "r1" and e.policy == "base" and e.knowledge_store is None for e in episodes)
    import jsonschema

    validator = jsonschema.Draft202012Validator(trajectory_schema())
    for line in path.read_text().splitlines():
        validator.validate(json.loads(line))
    for ep in episodes:
        assert ep.turns and all(render_play(t.context) == t.prompt for t in ep.turns)
        assert "only a guess" not in ep.turns[0].prompt[0].content
        # Each split samples with its own settings (extract: collect.extraction_sampling).
        assert all(1 <= t.response_tokens <= (6 if ep.split == "user" else 5) for t in ep.turns)


def test_collect_run_plays_textworld_too(project, tiny_model_dir):
    from oel.paths import ProjectPaths
    from oel.stages import collect
    from tests.conftest import tiny_params

    params = tiny_params(games={"frozenlake": {"enabled": False}, "sokoban": {"enabled": False}},
                         collect={"episodes_per_game": 1, "extraction_episodes_per_game": 1})
    summary = collect.run(params, ProjectPaths(project).round("r1"))
    assert set(summary) == {"textworld", "overall", "hostile_events"} and summary["overall"]["episodes"] == 2
    episodes = read_jsonl(project / "data" / "r1" / "trajectories.jsonl", Episode)
    assert all(e.game == "textworld" and e.turns for e in episodes)
    assert all(render_play(t.context) == t.prompt for e in episodes for t in e.turns)

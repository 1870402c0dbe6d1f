"""Lockstep engine with fake games and the fake backend: isolation, batching invariance, recording."""

from __future__ import annotations

import re

import pytest

from oel.config import SamplingParams
from oel.games.base import StepResult
from oel.prompts import render_play
from oel.rollout import EpisodeSpec, FakeBackend, derive_seed, play
from oel.rollout.backend import Generation
from oel.rollout.engine import NO_ACTION

SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=8)


class CountGame:
    """Reach `target` right-moves. Its text carries a per-episode secret so leaks are detectable."""

    name = "count"
    header = "You are an agent playing a game on a grid, acting as a reasoning engine."
    question = "What action do you take?"

    def __init__(self, budget: int = 5):
        self.budget = budget

    def reset(self, seed: int) -> str:
        self.seed, self.calls, self.pos = seed, 0, 0
        self.target = 1 + seed % 3
        return f"[GAME] secret-{seed}-start target {self.target}"

    def step(self, response: str) -> StepResult:
        self.calls += 1
        found = re.findall(r"\[(up|down|left|right)\]", response)
        action = found[-1] if found else None
        valid = action is not None
        self.pos += action == "right"
        won = self.pos >= self.target
        done = won or self.calls >= self.budget
        feedback = ("Success: reached" if won else "Failure: out of moves") if done else None
        return StepResult(f"[GAME] secret-{self.seed}-call{self.calls} pos {self.pos}", action, valid, done,
                          won, 1.0 if won else 0.0, feedback)


def specs(n: int = 10) -> list[EpisodeSpec]:
    return [EpisodeSpec("count", seed, "user") for seed in range(100, 100 + n)]


def run(backend, batch_size: int, n: int = 10, **kw):
    return play(specs(n), lambda _: CountGame(), backend, SAMPLING, round_id="r1", policy="base",
                batch_size=batch_size, progress=False, **kw)


def test_batched_and_one_at_a_time_give_identical_episodes():
    one = run(FakeBackend(), batch_size=1)
    for bs in (3, 4, 16):
        assert [e.model_dump() for e in run(FakeBackend(), batch_size=bs)] == [e.model_dump() for e in one]


def test_batching_keeps_episodes_apart():
    backend = FakeBackend()
    episodes = run(backend, batch_size=4)
    assert max(len(b) for b in backend.calls) == 4
    for ep in episodes:
        for turn in ep.turns:
            secrets = set(re.findall(r"secret-(\d+)-", turn.prompt[0].content))
            assert secrets == {str(ep.seed)}
    # Every prompt of a batch belongs to a different episode.
    for batch in backend.calls:
        owners = [re.search(r"secret-(\d+)-", p[0].content).group(1) for p in batch]
        assert len(set(owners)) == len(owners)


def test_refill_keeps_the_batch_full_and_order_is_spec_order():
    backend = FakeBackend()
    episodes = run(backend, batch_size=4, n=9)
    assert [e.seed for e in episodes] == list(range(100, 109))
    assert sum(len(b) for b in backend.calls) == sum(len(e.turns) for e in episodes)
    full = [len(b) for b in backend.calls[:-3]]
    assert all(n == 4 for n in full[:2])


def test_turns_record_prompt_response_action_context_and_tokens():
    script = ["thinking... [left] no, [right]", "hmm", "[right]", "[right]", "[right]"]
    calls = iter(script)
    backend = FakeBackend(lambda p: next(calls))
    [ep] = play([EpisodeSpec("count", 2, "extract")], lambda _: CountGame(), backend, SAMPLING,
                round_id="r3", policy="r2", progress=False)
    assert ep.episode_id == "r3-extract-count-2" and ep.split == "extract" and ep.policy == "r2"
    assert [t.action for t in ep.turns] == ["right", None, "right", "right"][: len(ep.turns)]
    assert ep.turns[0].response == script[0] and ep.turns[0].response_tokens == len(script[0].split()) + 1
    assert ep.turns[1].valid is False
    assert ep.success and ep.reward == 1.0 and ep.feedback.startswith("Success")
    # The transcript holds earlier actions as "[Player] [x]" (never earlier reasoning) and game text.
    last = ep.turns[-1].prompt[0].content
    assert "[Player] [right]" in last and f"[Player] [{NO_ACTION}]" in last and "thinking" not in last
    for turn in ep.turns:
        assert render_play(turn.context) == turn.prompt
        assert turn.context["header"] == CountGame.header


def test_a_specs_own_knowledge_wins_for_that_episode_only():
    specs = [EpisodeSpec("count", 1, knowledge="- EXPERIENCE ITEM: own rule", knowledge_store=3),
             EpisodeSpec("count", 1), EpisodeSpec("count", 2, episode_id="plain-2")]
    own, shared, plain = play(specs, lambda _n: CountGame(), FakeBackend(), SAMPLING, round_id="r1", policy="base",
                              knowledge="- EXPERIENCE ITEM: shared rule", knowledge_store=0, progress=False)
    assert own.knowledge_store == 3 and own.episode_id.endswith("-k3")
    assert all("own rule" in t.prompt[0].content and "shared rule" not in t.prompt[0].content for t in own.turns)
    assert shared.knowledge_store == 0 and all("shared rule" in t.prompt[0].content for t in shared.turns)
    assert plain.episode_id == "plain-2"

def test_knowledge_is_in_every_prompt_and_recorded():
    eps = run(FakeBackend(), batch_size=4, n=3, knowledge="- EXPERIENCE ITEM: go right", knowledge_store=1)
    for ep in eps:
        assert ep.knowledge_store == 1 and ep.episode_id.endswith("-k1")
        for turn in ep.turns:
            assert "go right" in turn.prompt[0].content and "only a guess" in turn.prompt[0].content
            assert render_play(turn.context) == turn.prompt
            assert render_play(turn.context, knowledge="")[0].content != turn.prompt[0].content
    plain = run(FakeBackend(), batch_size=4, n=3)
    assert all("only a guess" not in t.prompt[0].content for e in plain for t in e.turns)


def test_max_turns_guard_ends_a_runaway_episode():
    [ep] = play([EpisodeSpec("count", 0)], lambda _: CountGame(budget=10**6), FakeBackend(lambda p: "[up]"),
                SAMPLING, round_id="r1", policy="base", progress=False, max_turns=7)
    assert len(ep.turns) == 7 and not ep.success and "turn limit" in ep.feedback


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        run(FakeBackend(), batch_size=0)
    with pytest.raises(ValueError, match="duplicate"):
        play([EpisodeSpec("count", 1), EpisodeSpec("count", 1)], lambda _: CountGame(), FakeBackend(),
             SAMPLING, round_id="r1", policy="base", progress=False)

    class Short(FakeBackend):
        def generate(self, prompts, sampling, seed=None):
            return [Generation("[up]", 1)]

    with pytest.raises(RuntimeError, match="generations"):
        run(Short(), batch_size=4, n=3)


def test_call_seeds_are_deterministic_and_distinct():
    seen = []

    class Spy(FakeBackend):
        def generate(self, prompts, sampling, seed=None):
            seen.append(seed)
            return super().generate(prompts, sampling, seed)

    run(Spy(), batch_size=4, n=5, seed=7)
    first = list(seen)
    seen.clear()
    run(Spy(), batch_size=4, n=5, seed=7)
    assert seen == first and len(set(first)) == len(first)
    assert derive_seed(7, 0) == derive_seed(7, 0) != derive_seed(8, 0)
    assert 0 <= derive_seed(2**40, "x") < 2**31


def test_real_grid_games_play_through_the_engine():
    from pathlib import Path

    from oel.config import GamesParams
    from oel.games import make_game

    eps = play([EpisodeSpec("frozenlake", 11), EpisodeSpec("sokoban", 12)],
               lambda n: make_game(n, GamesParams(), Path(".")), FakeBackend(), SAMPLING,
               round_id="r1", policy="base", batch_size=2, progress=False)
    for ep in eps:
        assert 1 <= len(ep.turns) <= 5 and ep.feedback
        assert ep.turns[0].prompt[0].content.startswith(CountGame.header)
        assert all(render_play(t.context) == t.prompt for t in ep.turns)


def test_vllm_backend_says_how_to_install(monkeypatch):
    import builtins

    from oel.rollout import BackendError, VLLMBackend

    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("no vllm")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(BackendError, match="pip install"):
        VLLMBackend("some/model")


def test_chat_text_neutralises_a_tokenizers_own_exotic_special_tokens():
    from oel.rollout.backend import chat_text
    from oel.schemas import Message

    class Tok:
        def apply_chat_template(self, dicts, **kw):
            assert kw["enable_thinking"] is False and kw["add_generation_prompt"] is True
            return "|".join(d["content"] for d in dicts)

    out = chat_text(Tok(), [Message(role="user", content="a ENDTURN b")], False, frozenset({"ENDTURN"}))
    assert "ENDTURN" not in out and out.startswith("a E")

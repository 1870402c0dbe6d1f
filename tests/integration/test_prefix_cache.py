"""The transformers backend's prefix cache must change nothing but the work done (tiny random model)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from oel.config import SamplingParams
from oel.models.prompt_cache import MIN_REUSE, common_prefix, supports_prefix_cache
from oel.prompts import play_context, render_play
from oel.rollout import TransformersBackend

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
HEADER = "You are an agent playing a game on a grid, acting as a reasoning engine. " * 2


def play_prompt(transcript: str) -> list:
    return render_play(play_context(HEADER, transcript, "Which move?"))


def step_logits(model, inputs: dict) -> tuple[list[list[int]], list]:
    import torch

    width = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=GREEDY.max_new_tokens, min_new_tokens=GREEDY.max_new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, width:].tolist(), list(out.logits)


def assert_same_steps(model, got_inputs: dict, ref_inputs: dict) -> None:
    import torch

    got_tokens, got_logits = step_logits(model, got_inputs)
    ref_tokens, ref_logits = step_logits(model, ref_inputs)
    assert got_tokens == ref_tokens
    for got, ref in zip(got_logits, ref_logits, strict=True):
        assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()  # honest: ~3e-7


def test_shared_prefix_plus_padding_gives_the_logits_of_plain_left_padding(tiny_model):
    import torch

    backend = TransformersBackend(tiny_model)
    # Different lengths after the shared part: padding sits between the cached prefix and each suffix.
    batch = [play_prompt("[GAME] board " + "row " * (4 * i)) for i in range(4)]
    rows = backend.prompt_ids(batch)
    with torch.inference_mode():
        cached = backend._inputs(rows)
    shared = cached["cache"].get_seq_length()
    assert shared >= MIN_REUSE and shared == common_prefix(rows)
    assert (cached["attention_mask"][:, shared] == 0).any()  # padding really is in the middle
    assert_same_steps(tiny_model.model, cached, backend.encode(batch))


def test_next_turn_prefills_only_what_it_adds_and_matches_the_full_prefill(tiny_model):
    import torch

    backend = TransformersBackend(tiny_model)
    first = play_prompt("[GAME] board")
    second = play_prompt("[GAME] board\n[Player] [up]\n[GAME] you moved up")
    backend.generate([first], GREEDY)
    before = backend.prefill_tokens
    backend.generate([second], GREEDY)
    a, b = backend.prompt_ids([first, second])
    reused = common_prefix([a, b])
    assert reused >= MIN_REUSE
    # The first call kept its prompt's states; the second prefills only what follows the shared part.
    assert backend.prefill_tokens - before == len(b) - reused
    with torch.inference_mode():
        cached = backend._inputs([b])
    assert cached["cache"].get_seq_length() == len(b) - 1  # the row itself was kept by the second call
    assert_same_steps(tiny_model.model, cached, backend.encode([second]))


def turns(n: int) -> tuple[list, list]:
    first = [f"[GAME] board {i} " + "cell " * (3 * i) for i in range(n)]
    return ([play_prompt(t) for t in first],
            [play_prompt(f"{t}\n[Player] [up]\n[GAME] you moved up to {i}") for i, t in enumerate(first)])


def test_each_episode_in_a_batch_reuses_its_own_previous_turn(tiny_model):
    import torch

    backend = TransformersBackend(tiny_model)
    turn1, turn2 = turns(3)
    backend.generate(turn1, GREEDY)
    rows1, rows2 = backend.prompt_ids(turn1), backend.prompt_ids(turn2)
    plan = backend.cache.plan(rows2)
    assert plan.reuse == [common_prefix([a, b]) for a, b in zip(rows1, rows2, strict=True)]
    assert min(plan.reuse) > common_prefix(rows2)  # beyond what the batch shares
    with torch.inference_mode():
        cached = backend._inputs(rows2)
    assert_same_steps(tiny_model.model, cached, backend.encode(turn2))


def test_over_the_memory_budget_only_the_shared_prefix_is_kept(tiny_model):
    import torch

    backend = TransformersBackend(tiny_model, cache_bytes=1)
    turn1, turn2 = turns(3)
    backend.generate(turn1, GREEDY)
    assert [e.ids for e in backend.cache.entries] == [backend.prompt_ids(turn1)[0][:common_prefix(
        backend.prompt_ids(turn1))]]
    rows2 = backend.prompt_ids(turn2)
    with torch.inference_mode():
        cached = backend._inputs(rows2)
    assert cached["cache"].get_seq_length() == common_prefix(rows2)
    assert_same_steps(tiny_model.model, cached, backend.encode(turn2))


def test_cache_on_and_off_generate_the_same_batch(tiny_model):
    batch = [play_prompt("[GAME] board " + "row " * i) for i in range(3)]
    on, off = TransformersBackend(tiny_model), TransformersBackend(tiny_model, prefix_cache=False)
    assert on.prefix_cache and not off.prefix_cache
    hot = SamplingParams(temperature=1.0, max_new_tokens=8)
    assert on.generate(batch, hot, seed=3) == off.generate(batch, hot, seed=3)
    assert on.prompt_tokens == off.prompt_tokens
    assert on.prefill_tokens < off.prefill_tokens


def test_a_batch_mixing_two_games_shares_each_game_header(tiny_model):
    import torch

    backend = TransformersBackend(tiny_model)
    other = "Welcome to a text adventure in a house with many rooms and doors, find the coin. " * 2
    batch = [play_prompt(f"[GAME] board {i}") for i in range(2)]
    batch += [render_play(play_context(other, f"[GAME] room {i}", "Which move?")) for i in range(2)]
    rows = backend.prompt_ids(batch)
    assert common_prefix(rows) < MIN_REUSE  # nothing batch-wide to share beyond the chat template
    plan = backend.cache.plan(rows)
    assert plan.reuse[0] == plan.reuse[1] == common_prefix(rows[:2]) >= MIN_REUSE
    assert plan.reuse[2] == plan.reuse[3] == common_prefix(rows[2:]) >= MIN_REUSE
    with torch.inference_mode():
        cached = backend._inputs(rows)
    assert_same_steps(tiny_model.model, cached, backend.encode(batch))


def test_short_shared_prefix_takes_the_plain_path(tiny_model):
    backend = TransformersBackend(tiny_model)
    assert backend.cache.plan([[1, 2, 3, 4], [1, 2, 9, 9]]) is None
    assert "cache" not in backend._inputs([[1, 2, 3, 4], [1, 2, 9, 9]])


def test_a_failing_prefix_pass_falls_back_to_full_prefill_once(tiny_model, caplog):
    backend = TransformersBackend(tiny_model)
    reference = TransformersBackend(tiny_model, prefix_cache=False)

    def broken(_rows):
        raise RuntimeError("unsupported cache layout")

    backend.cache.plan = broken
    batch = [play_prompt("[GAME] board")]
    with caplog.at_level(logging.WARNING):
        assert backend.generate(batch, GREEDY) == reference.generate(batch, GREEDY)
    assert not backend.prefix_cache
    assert "prefix cache disabled" in caplog.text


def _stub(forward_has_position_ids: bool = True, **cfg):
    text = SimpleNamespace(**cfg)

    class Model:
        config = SimpleNamespace(get_text_config=lambda decoder=True: text)

        if forward_has_position_ids:
            def forward(self, input_ids, attention_mask=None, position_ids=None): ...
        else:
            def forward(self, input_ids, attention_mask=None): ...

    return Model()


@pytest.mark.parametrize(("model", "supported"), [
    (_stub(layer_types=["full_attention"] * 2), True),
    (_stub(), True),
    (_stub(layer_types=["full_attention", "sliding_attention"]), False),
    (_stub(sliding_window=4096), False),
    (_stub(is_encoder_decoder=True), False),
    (_stub(forward_has_position_ids=False), False),
])
def test_prefix_cache_only_for_models_where_it_is_exact(model, supported):
    assert supports_prefix_cache(model) is supported


def test_supported_for_the_tiny_model(tiny_model):
    assert supports_prefix_cache(tiny_model.model)


def testcommon_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]], limit=2) == 2
    assert common_prefix([[5], [6]]) == 0
    assert common_prefix([[1]], limit=0) == 0

"""Every OOD checker on a passing and a failing answer (IFEval's own checkers through the adapter, and the
five IFEval lacks); the shipped probe files; scoring and the drop flag."""

from __future__ import annotations

import json
import logging

import pytest

from oel.errors import UserError
from oel.ood import compare_to_base, load_heldout_text, load_instructions, score_responses
from oel.ood.checkers import CHECKERS
from oel.ood.lm import strip_thinking

# (checker, kwargs, passing answer, failing answer)
CASES = [
    ("max_words", {"n": 5}, "one two three four five", "one two three four five six"),
    ("min_words", {"n": 3}, "one two three", "one two"),
    ("include_keywords", {"keywords": ["pine", "Quiet"]}, "The quiet pine wood.", "The oak is quiet."),
    ("exclude_words", {"forbidden": ["sun"]}, "Sunny skies and warmth.", "The sun is out."),
    ("all_lowercase", {}, "all small here, 42.", "Not all small."),
    ("all_uppercase", {}, "STOP RIGHT THERE!", "STOP right there"),
    ("bullet_count", {"n": 2}, "- a\n- b", "- a\n- b\n- c"),
    ("numbered_count", {"n": 2}, "1. a\n2) b", "1. a"),
    ("json_output", {"keys": ["a"]}, '```json\n{"a": 1}\n```', '{"b": 1}'),
    ("no_commas", {}, "No commas here.", "Yes, one comma."),
    ("ends_with", {"phrase": "Thank you."}, "Bye now. thank you.\n", "Thank you. Bye."),
    ("starts_with", {"phrase": "Yes"}, '"Yes, it is."', "Well, yes."),
    ("max_sentences", {"n": 2}, "One. Two!", "One. Two. Three?"),
    ("keyword_frequency", {"keyword": "blue", "n": 2}, "Blue sky, blue sea.", "Blue sky, green sea."),
    ("wrapped_in_quotes", {}, ' "quoted" ', 'not "quoted"'),
    ("has_title", {}, "<<My Poem>>\nline", "<My Poem>\nline"),
    ("placeholders", {"n": 2}, "Dear [name], on [date].", "Dear [name], today."),
    ("paragraphs", {"n": 2}, "one\n***\ntwo", "one\n\ntwo"),
    ("contains_digit", {}, "In 1945.", "In nineteen forty-five."),
    ("no_digits", {}, "five", "5"),
    ("postscript", {"marker": "P.S."}, "Hello.\nP.S. bye", "Hello.\nPS bye"),
]


def test_ifeval_checks_are_the_librarys_verdicts():
    """Each adapted check agrees with if-verifiable's own evaluator (strict) on both answers of its case,
    and keeps IFEval's semantics where they differ from a hand-written check (keywords are substrings)."""
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    from oel.ood.checkers import IFEVAL, OWN

    assert set(IFEVAL) | set(OWN) == set(CHECKERS) and not set(IFEVAL) & set(OWN)
    for name, kwargs, good, bad in CASES:
        if name not in IFEVAL:
            continue
        instruction_id, translate = IFEVAL[name]
        lib_kwargs = translate(**{k: v for k, v in kwargs.items() if k != "keys"})
        for answer in (good, bad):
            results, _ = evaluate_instructions(answer, [instruction_id], [lib_kwargs], "p", INSTRUCTION_DICT)
            assert CHECKERS[name](answer, **kwargs) is (results[0].strict_pass and (name != "json_output" or
                                                                                    answer == good)), name
    assert CHECKERS["include_keywords"]("The pineapple is quiet.", keywords=["pine"]) is True


def test_every_checker_is_covered():
    assert {c[0] for c in CASES} == set(CHECKERS)


@pytest.mark.parametrize(("name", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_checker_both_ways(name, kwargs, good, bad):
    assert CHECKERS[name](good, **kwargs) is True
    assert CHECKERS[name](bad, **kwargs) is False


@pytest.mark.parametrize("name", ["max_words", "exclude_words", "all_lowercase", "all_uppercase", "no_commas",
                                  "no_digits", "max_sentences"])
def test_empty_answer_never_passes(name):
    kwargs = {"max_words": {"n": 5}, "exclude_words": {"forbidden": ["x"]}, "max_sentences": {"n": 2}}.get(name, {})
    assert CHECKERS[name]("   ", **kwargs) is False


def test_shipped_prompts_load_and_their_examples_pass():
    prompts = load_instructions()
    assert 45 <= len(prompts) <= 60
    assert len({p.id for p in prompts}) == len(prompts)
    used = {c["type"] for p in prompts for c in p.checks}
    assert used == set(CHECKERS)  # every checker is exercised by the probe
    for p in prompts:
        assert all(p.results(p.example)), p.id  # the checks of each prompt are satisfiable
        assert not all(p.results("")), p.id  # ...and an empty answer fails them


def test_heldout_text_is_twenty_plain_paragraphs():
    paras = load_heldout_text()
    assert len(paras) == 20
    assert all(25 <= len(p.split()) <= 120 for p in paras)  # short, but long enough to score


def test_bad_prompt_files_fail_with_the_line():
    unknown = json.dumps({"id": "x", "prompt": "p", "checks": [{"type": "rhymes"}]})
    with pytest.raises(UserError, match=r":1: prompt 'x': unknown check 'rhymes'"):
        load_instructions(unknown)
    bad_args = json.dumps({"id": "y", "prompt": "p", "checks": [{"type": "max_words", "count": 3}]})
    with pytest.raises(UserError, match="max_words"):
        load_instructions("\n" + bad_args)


def test_score_is_prompt_level_strict():
    prompts = load_instructions("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "p", "checks": [{"type": "all_lowercase"}, {"type": "no_commas"}]},
        {"id": "b", "prompt": "p", "checks": [{"type": "contains_digit"}]},
    ]))
    s = score_responses(prompts, ["lower, with comma", "7"])
    assert s["instruction_pass"] == 0.5            # prompt a fails one of its two checks
    assert s["instruction_level_pass"] == pytest.approx(2 / 3)
    assert s["failed"] == ["a"]
    assert s["instruction_ci_low"] < 0.5 < s["instruction_ci_high"]
    with pytest.raises(ValueError):
        score_responses(prompts, ["only one"])


def test_drop_flag(caplog):
    base = {"instruction_pass": 0.5, "loglik_nats_per_token": -3.0}
    assert compare_to_base({"instruction_pass": 0.45, "loglik_nats_per_token": -3.1}, base, 0.1)["flag"] is False
    with caplog.at_level(logging.WARNING):
        out = compare_to_base({"instruction_pass": 0.3, "loglik_nats_per_token": -3.0}, base, 0.1)
    assert out["flag"] is True and out["instruction_pass_delta"] == pytest.approx(-0.2)
    assert "OOD drop" in caplog.text
    # loglik 20% worse than base's |loglik| trips the flag even when instructions hold up
    assert compare_to_base({"instruction_pass": 0.5, "loglik_nats_per_token": -3.6}, base, 0.1)["flag"] is True
    assert compare_to_base({"instruction_pass": 0.0, "loglik_nats_per_token": -9.0}, None, 0.1) == {"flag": False}


def test_thinking_is_not_part_of_the_answer():
    assert strip_thinking("<think>Let me, think</think>\nno commas") == "no commas"
    assert strip_thinking("<think>never closed") == ""

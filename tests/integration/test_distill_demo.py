"""The mechanism on the embedded default: "Always answer in French." moves from the prompt into the weights."""

from __future__ import annotations

import pytest

from oel.distill.demo import is_french


def test_french_judge():
    assert is_french("Je suis très content de vous voir, c'est la vie.")
    assert is_french("Mon plat préféré est la ratatouille avec du pain.")
    assert not is_french("My favourite food is pizza with cheese and the tomato sauce.")
    assert not is_french("Pizza.")


@pytest.mark.slow
def test_french_is_distilled_into_the_student(project):
    from oel.distill.demo import run_demo

    lines: list[str] = []
    result = run_demo(steps=20, model_spec="smollm2-135m-instruct", echo=lines.append)
    assert result["teacher_french"] >= 6, lines  # the knowledge works in context
    assert result["french_before"] <= 2, lines
    assert result["french_after"] >= 6, lines
    assert result["kl_after"] <= 0.5 * result["kl_before"], lines

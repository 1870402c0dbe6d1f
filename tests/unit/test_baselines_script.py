"""scripts/baselines.py: TextWorld settings from the command line, and report rows with Wilson intervals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from oel.config import TextWorldParams

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "baselines.py"


@pytest.fixture(scope="module")
def baselines():
    spec = importlib.util.spec_from_file_location("baselines_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_setting_replaces_challenge_level_and_budget_only(baselines):
    base = TextWorldParams(show_objective=False)
    tw = baselines.parse_setting("tw-coin_collector:5:10", base)
    assert (tw.challenges, tw.level, tw.max_turns, tw.show_objective) == (["tw-coin_collector"], 5, 10, False)
    assert baselines.setting_name(tw) == "tw-coin_collector level 5, 10 calls"


@pytest.mark.parametrize("text", ["tw-coin_collector:5", "tw-coin_collector:x:10", "tw-nope:1:8",
                                  "tw-treasure_hunter:31:8"])
def test_bad_setting_is_one_line(baselines, text):
    with pytest.raises(SystemExit) as err:
        baselines.parse_setting(text, TextWorldParams())
    assert str(err.value).startswith(f"--textworld {text!r}: ") and "\n" not in str(err.value)


def test_report_rows_carry_n_rate_and_wilson_interval(baselines):
    row = baselines.Row("textworld", "tw-treasure_hunter level 5, 8 calls", "random", 100, 8, 300.0)
    shape = baselines.Shape("tw-treasure_hunter level 5, 8 calls", 100, 2.5, 530.0, 3.9, 3.0, 3)
    text = baselines.report(1234, [row], [shape])
    assert "| textworld | tw-treasure_hunter level 5, 8 calls | random | 100 | 0.080 | [0.041, 0.150] | 300 |" in text
    assert "| tw-treasure_hunter level 5, 8 calls | 2.50 | 100 | 530 | 3.9 | 3.0 (3) |" in text

"""The serving commands' one-line errors and the feedback value's parse; the served path itself runs in
tests/integration/test_online_stack.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from oel.cli import _feedback_value, app
from tests.conftest import tiny_params


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params().model_dump(mode="json", by_alias=True), sort_keys=False))
    return path


def test_route_without_a_running_stack_is_one_line(params_file: Path):
    done = CliRunner().invoke(app, ["route", "--params", str(params_file), "--root", str(params_file.parent)])
    assert done.exit_code == 2
    assert done.output.strip().startswith("error: no `oel serve` runs for")


def test_promote_and_rollback_leave_serving_alone_when_nothing_serves(params_file: Path):
    # No stack: a rollback with nothing promoted fails on its own terms, not on the gateway.
    done = CliRunner().invoke(app, ["rollback", "--reason", "test", "--params", str(params_file),
                                    "--root", str(params_file.parent)])
    assert done.exit_code == 2 and "nothing to roll back" in done.output and "gateway" not in done.output


@pytest.mark.parametrize("args", [["--value", "1"], ["tr-1", "--conversation", "c", "--value", "1"]])
def test_feedback_names_one_request(params_file: Path, args):
    done = CliRunner().invoke(app, ["feedback", *args, "--params", str(params_file)])
    assert done.exit_code == 2
    assert "error: name the request: a TRACE_ID, or --conversation ID" in done.output


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("false", False), ("1", 1), ("0.25", 0.25), ("too long", "too long"),
    ('"quoted"', "quoted"), ("[1, 2]", "[1, 2]"), ("null", "null"),
])
def test_a_feedback_value_keeps_its_type(text, value):
    parsed = _feedback_value(text)
    assert parsed == value and type(parsed) is type(value)

"""The serve section: defaults that bind loopback, and every bad value one line naming the key."""

from __future__ import annotations

import pytest

from oel.config import ParamsError, parse_params


def test_defaults_serve_on_loopback_with_the_gate_deciding_alone():
    serve = parse_params({}).serve
    assert serve.host == "127.0.0.1"
    assert serve.canary == 0.0
    assert serve.port != serve.engine_port


@pytest.mark.parametrize(("section", "says"), [
    ({"port": 6000, "engine_port": 6000}, "serve: port and engine_port are both 6000"),
    ({"canary": 1.0}, "serve.canary: Input should be less than 1"),
    ({"canary": 0.005}, "serve: canary 0.005: the gateway splits traffic in whole percents"),
    ({"canary": -0.1}, "serve.canary: Input should be greater than or equal to 0"),
    ({"endpoint": "my model"}, "serve: endpoint 'my model': use letters"),
    ({"experiment": " "}, "serve: experiment: name the experiment"),
    ({"host": ""}, "serve: host '': give an address"),
    ({"max_loras": 1}, "serve.max_loras: Input should be greater than or equal to 2"),
    ({"engine": "tgi"}, "serve.engine: Input should be 'auto', 'transformers' or 'vllm'"),
    ({"porrt": 1}, "serve.porrt: unknown key"),
])
def test_a_bad_serve_value_is_one_line_naming_the_key(section, says):
    with pytest.raises(ParamsError) as err:
        parse_params({"serve": section}, "params.yaml")
    message = str(err.value)
    assert message.startswith(f"params.yaml: {says}"), message
    assert "\n" not in message

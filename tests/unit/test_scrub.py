"""oel.scrub: Presidio with no downloaded model replaces personal data by consistent placeholders; the deny-list
terms never show in what MLflow or `oel params` print; a scrub never reaches the network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from oel.config import ParamsError, ScrubParams, parse_params
from oel.schemas import Episode, Message, Turn
from oel.scrub import Scrubber, scrub_episodes


@pytest.fixture(scope="module")
def scrub() -> Scrubber:
    return Scrubber(ScrubParams(deny={"PERSON": ["Ada Lovelace", "Ada"], "PROJECT": ["Falcon"]}))


@pytest.mark.parametrize("value, label", [
    ("ada.l@example.com", "EMAIL"),
    ("+1 (415) 555-0132", "PHONE"),
    ("020 7946 0958", "PHONE"),
    ("4111 1111 1111 1111", "CARD"),
    ("5500-0000-0000-0004", "CARD"),
    ("DE89 3704 0044 0532 0130 00", "IBAN"),
    ("GB82WEST12345698765432", "IBAN"),
    ("192.168.1.20", "IP"),
    ("2001:db8::1", "IP"),
    ("https://shop.example.org/orders/42?u=7", "URL"),
    ("www.acme.io", "URL"),
])
def test_each_kind_is_replaced_whole(value, label):
    out = Scrubber(ScrubParams()).text(f"Reach me at {value} today.")
    assert out == f"Reach me at [{label}_1] today."


@pytest.mark.parametrize("text", [
    "Card 4111 1111 1111 1112 fails its Luhn check.",     # not a card number
    "IBAN DE89 3704 0044 0532 0130 01 has a bad checksum.",
    "Order 12345 ships on 2024-05-02 for 19.99 EUR.",
    "Move up, then left, then down.",
])
def test_what_is_not_personal_data_stays(text):
    assert Scrubber(ScrubParams()).text(text) == text


def test_the_same_value_gets_the_same_placeholder_across_texts(scrub):
    first = scrub.text("Mail ada.l@example.com or bob@example.org, or call +44 20 7946 0958.")
    second = scrub.text("Again: ADA.L@example.com, then +442079460958. And bob@example.org.")
    assert first == "Mail [EMAIL_1] or [EMAIL_2], or call [PHONE_1]."   # numbered in the order first met
    assert second == "Again: [EMAIL_1], then [PHONE_1]. And [EMAIL_2]."


def test_deny_terms_match_whole_words_case_and_spacing_aside(scrub):
    out = scrub.text("ADA  LOVELACE met Ada about\nfalcon; Adam and Falconry stay.")
    assert out == "[PERSON_1] met [PERSON_2] about\n[PROJECT_1]; Adam and Falconry stay."
    assert scrub.text("Ada Lovelace") == "[PERSON_1]"  # the longest term first, and the same placeholder


def test_allowed_values_stay_but_allow_nothing_around_them():
    scrub = Scrubber(ScrubParams(allow=["help@oel.dev", "oel.dev"]))
    # The allowed address's domain is not a URL of its own; an address at an allowed domain is still personal.
    assert scrub.text("Write to help@oel.dev, see oel.dev, not ada@oel.dev.") == \
        "Write to help@oel.dev, see oel.dev, not [EMAIL_1]."


def test_two_scrubbers_of_one_input_agree():
    text = "ada@example.com, 4111 1111 1111 1111, 10.0.0.7, https://x.example.com/a"
    assert Scrubber(ScrubParams()).text(text) == Scrubber(ScrubParams()).text(text)


def test_chosen_entities_only():
    scrub = Scrubber(ScrubParams(entities=["email"]))
    assert scrub.text("ada@example.com from 10.0.0.7") == "[EMAIL_1] from 10.0.0.7"
    assert Scrubber(ScrubParams(entities=[])).text("ada@example.com") == "ada@example.com"
    # a label with no terms matches nothing (an empty alternation would match everywhere)
    assert Scrubber(ScrubParams(entities=[], deny={"PERSON": []})).text("hello there") == "hello there"


def _chat_episode() -> Episode:
    system = Message(role="system", content="Support for Falcon customers.")
    ask = Message(role="user", content="I'm Ada Lovelace, ada@example.com, card 4111 1111 1111 1111.")
    call = [{"id": "t1", "type": "function",
             "function": {"name": "lookup", "arguments": '{"email": "ada@example.com"}'}}]
    first = Turn(index=0, prompt=[system, ask], response="", valid=True, observation="found +1 415 555 0132",
                 tool_calls=call)
    tool = Message(role="tool", content="found +1 415 555 0132", tool_call_id="t1", name="lookup")
    second = Turn(index=1, prompt=[system, ask, Message(role="assistant", content="", tool_calls=call), tool],
                  response="Ada, I will call +1 415 555 0132.", valid=True, observation="Mail me at 10.1.2.3 ok",
                  token_ids=[1, 2, 3], response_tokens=3)
    return Episode(episode_id="tr-1", game="chat", seed=1, split="imported", round="r1", policy="deployed",
                   turns=[first, second], success=False, reward=0.0, feedback="ada@example.com says thanks",
                   trace_ids=["tr-1", "tr-2"])


def test_every_text_of_a_conversation_is_scrubbed_and_game_episodes_are_left_alone():
    game = Episode(episode_id="g", game="frozenlake", seed=3, split="user", round="r1", policy="base",
                   turns=[Turn(index=0, prompt=[Message(role="user", content="10.0.0.1 ada@example.com")],
                               response="up", valid=True, observation="")], success=True, reward=1.0,
                   feedback="Success")
    (chat, same_game), found = scrub_episodes([_chat_episode(), game], ScrubParams(deny={"PERSON": ["Ada Lovelace",
                                                                                                 "Ada"]}))
    dumped = chat.model_dump_json()
    for secret in ("ada@example.com", "4111", "415 555", "Lovelace", "10.1.2.3", "Ada"):
        assert secret not in dumped
    assert found == {"CARD": 1, "EMAIL": 1, "IP": 1, "PERSON": 2, "PHONE": 1}
    assert chat.turns[0].tool_calls[0]["function"]["arguments"] == '{"email": "[EMAIL_1]"}'  # still JSON
    assert chat.turns[1].prompt[1].content == "I'm [PERSON_1], [EMAIL_1], card [CARD_1]."
    assert chat.feedback == "[EMAIL_1] says thanks" and chat.trace_ids == ["tr-1", "tr-2"]
    assert chat.turns[1].token_ids is None  # the response changed: its logged ids no longer spell it
    assert same_game == game


def test_token_ids_stay_when_the_response_is_untouched():
    ep = _chat_episode()
    clean = ep.model_copy(update={"turns": [ep.turns[0], ep.turns[1].model_copy(update={"response": "Done."})]})
    (out,), _ = scrub_episodes([clean], ScrubParams())
    assert out.turns[1].token_ids == [1, 2, 3]


def test_deny_terms_never_reach_mlflow_params_or_oel_params():
    params = parse_params({"collect": {"scrub": {"deny": {"PERSON": ["Ada Lovelace", "Bob"]}}}})
    assert params.collect.scrub.deny == {"PERSON": ["Ada Lovelace", "Bob"]}
    shown = params.model_dump_json()  # what tracking's params, `oel params` and the registry hash are made from
    assert "Lovelace" not in shown and "Bob" not in shown
    assert params.model_dump(mode="json")["collect"]["scrub"]["deny"] == {"PERSON": "2 terms (not shown)"}


@pytest.mark.parametrize("scrub, says", [
    ({"deny": {"person": ["x"]}}, "collect.scrub.deny: label 'person': use capitals"),
    ({"deny": {"EMAIL": ["x"]}}, "collect.scrub.deny: label 'EMAIL': use capitals"),
    ({"deny": {"PERSON": ["  "]}}, "collect.scrub.deny: PERSON[0]: a term needs a letter or digit"),
    ({"deny": {"A": ["Secret Name"], "B": ["secret  name"]}}, "collect.scrub.deny: B[0]: the same term is already"),
    ({"deny": ["Secret Name"]}, "collect.scrub.deny: Input should be a valid dictionary"),
    ({"entities": ["email", "email"]}, "collect.scrub.entities: an entity is listed twice"),
    ({"entities": ["names"]}, "collect.scrub.entities.0: Input should be 'email'"),
    ({"allow": [" "]}, "collect.scrub.allow: an allowed value is empty"),
])
def test_a_bad_scrub_section_is_one_line_that_does_not_echo_a_term(scrub, says):
    with pytest.raises(ParamsError) as err:
        parse_params({"collect": {"scrub": scrub}}, "params.yaml")
    assert str(err.value).startswith(f"params.yaml: {says}") and "\n" not in str(err.value)
    assert "Secret" not in str(err.value)


def test_a_scrub_never_reaches_the_network(tmp_path):
    # A fresh process whose sockets refuse to connect and whose home has no tldextract cache: Presidio builds
    # without a spaCy model and the e-mail check reads the bundled suffix list.
    script = textwrap.dedent("""
        import socket
        def refuse(*args, **kwargs):
            raise SystemExit("network access: " + repr(args))
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse  # tldextract's default extractor resolves publicsuffix.org first
        from oel.config import ScrubParams
        from oel.scrub import Scrubber
        print(Scrubber(ScrubParams()).text("ada@example.co.uk at https://example.com from 10.0.0.1"))
    """)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("TLDEXTRACT_CACHE", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[EMAIL_1] at [URL_1] from [IP_1]"
    assert not any(tmp_path.rglob("*")), "nothing is cached in the home folder"


def test_a_round_on_a_chat_log_writes_its_conversations_scrubbed(tmp_path):
    import json

    from oel.artifacts import read_jsonl
    from oel.paths import ProjectPaths
    from oel.stages import collect
    from tests.conftest import tiny_params

    (tmp_path / "chatlogs").mkdir()
    (tmp_path / "chatlogs" / "week1.jsonl").write_text(json.dumps({"id": "c-1", "messages": [
        {"role": "user", "content": "My card is 4111 1111 1111 1111, mail ada@example.com."},
        {"role": "assistant", "content": "Noted, ada@example.com."},
        {"role": "user", "content": "Thanks."}]}) + "\n")
    params = tiny_params(rounds={"r1": {"from": "base", "collect": {"source": "chatlog",
                                                                    "chatlog": "chatlogs/week1.jsonl"}}},
                         collect={"import_heldout_fraction": 0.0})
    paths = ProjectPaths(tmp_path).round("r1")
    summary = collect.run(params, paths)
    assert summary["scrubbed"] == {"CARD": 1, "EMAIL": 1}
    (ep,) = read_jsonl(paths.trajectories, Episode)
    assert ep.turns[0].prompt[0].content == "My card is [CARD_1], mail [EMAIL_1]." and ep.turns[0].response == \
        "Noted, [EMAIL_1]."
    assert "ada@example.com" not in paths.trajectories.read_text()

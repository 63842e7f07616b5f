"""``sftray.data.formats``: format detection by keys and conversion of each format to a messages list."""

from __future__ import annotations

import pytest
from testkit import A, U

from sftray.data.errors import DataError, FormatError, MessageError
from sftray.data.formats import FORMAT_KEYS, detect_format, to_messages

WHERE = "chats.jsonl:7"
EXPECTED_KEYS = (
    "expected one of (messages: messages; sharegpt: conversations; alpaca: instruction, output; "
    "prompt_completion: prompt, completion; text: text)"
)


def S(c: str) -> dict:
    return {"role": "system", "content": c}


# --- detect_format ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": [], "id": 3}, "sharegpt"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t"}, "text"),
    ],
)
def test_detect_format_by_keys(record: dict, fmt: str) -> None:
    assert detect_format(record) == fmt


def test_detect_format_tries_formats_in_order() -> None:
    # A record carrying several formats' keys gets the first in FORMAT_KEYS order.
    assert list(FORMAT_KEYS) == ["messages", "sharegpt", "alpaca", "prompt_completion", "text"]
    assert detect_format({"text": "t", "prompt": "p", "completion": "c"}) == "prompt_completion"
    assert detect_format({"messages": [], "conversations": []}) == "messages"


def test_detect_format_needs_all_identifying_keys() -> None:
    with pytest.raises(FormatError) as info:
        detect_format({"instruction": "only half of alpaca"}, where=WHERE)
    assert info.value.reason == "unknown_format"
    assert str(info.value) == (f"{WHERE}: cannot detect the format from keys ['instruction']; {EXPECTED_KEYS}")


def test_detect_format_unknown_keys_lists_every_format() -> None:
    with pytest.raises(FormatError) as info:
        detect_format({"question": "q", "answer": "a"}, where=WHERE)
    assert info.value.reason == "unknown_format"
    assert str(info.value) == f"{WHERE}: cannot detect the format from keys ['answer', 'question']; {EXPECTED_KEYS}"
    assert isinstance(info.value, DataError)


def test_detect_format_default_where() -> None:
    with pytest.raises(FormatError, match=r"^record: cannot detect the format from keys \[\]"):
        detect_format({})


# --- messages ------------------------------------------------------------------------------------------------


def test_messages_passthrough() -> None:
    msgs = [U("hi"), A("hello")]
    assert to_messages({"messages": msgs, "meta": 1}, "messages") == [U("hi"), A("hello")]


def test_messages_must_be_a_list() -> None:
    with pytest.raises(FormatError) as info:
        to_messages({"messages": "hi"}, "messages", where=WHERE)
    assert info.value.reason == "bad_format"
    assert str(info.value) == f"{WHERE}: 'messages' must be a list, got str"


# --- sharegpt ------------------------------------------------------------------------------------------------


def test_sharegpt_roles_map() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ]
    }
    assert to_messages(record, "sharegpt") == [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")]


def test_sharegpt_unknown_from_names_index() -> None:
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    with pytest.raises(MessageError) as info:
        to_messages(record, "sharegpt", where=WHERE)
    assert info.value.reason == "unknown_role"
    assert str(info.value) == (
        f"{WHERE}: conversations[1] has unknown 'from' 'bot'; valid: human, user, gpt, assistant, system"
    )


def test_sharegpt_missing_value() -> None:
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}
    with pytest.raises(MessageError) as info:
        to_messages(record, "sharegpt", where=WHERE)
    assert info.value.reason == "bad_content"
    assert str(info.value) == f"{WHERE}: conversations[1] (gpt) has no 'value'"


@pytest.mark.parametrize("turn", [{"value": "no from"}, "just a string"])
def test_sharegpt_turn_without_from(turn: object) -> None:
    with pytest.raises(FormatError) as info:
        to_messages({"conversations": [{"from": "human", "value": "q"}, turn]}, "sharegpt", where=WHERE)
    assert info.value.reason == "bad_format"
    assert str(info.value) == f"{WHERE}: conversations[1] needs 'from' and 'value'"


def test_sharegpt_conversations_must_be_a_list() -> None:
    with pytest.raises(FormatError, match=r"'conversations' must be a list, got dict$"):
        to_messages({"conversations": {"from": "human"}}, "sharegpt", where=WHERE)


# --- alpaca --------------------------------------------------------------------------------------------------


def test_alpaca_without_input() -> None:
    assert to_messages({"instruction": "Add 2 and 3.", "output": "5"}, "alpaca") == [U("Add 2 and 3."), A("5")]


def test_alpaca_with_input() -> None:
    record = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    assert to_messages(record, "alpaca") == [U("Translate to French.\n\ncat"), A("chat")]


@pytest.mark.parametrize("empty", ["", "   \n", None])
def test_alpaca_empty_input_is_ignored(empty: object) -> None:
    record = {"instruction": "Say hi.", "input": empty, "output": "hi"}
    assert to_messages(record, "alpaca") == [U("Say hi."), A("hi")]


def test_alpaca_non_string_instruction() -> None:
    with pytest.raises(MessageError) as info:
        to_messages({"instruction": ["x"], "output": "o"}, "alpaca", where=WHERE)
    assert info.value.reason == "bad_content"
    assert str(info.value) == f"{WHERE}: alpaca instruction/input must be strings"


# --- prompt_completion ----------------------------------------------------------------------------------------


def test_prompt_completion_strings() -> None:
    assert to_messages({"prompt": "2+2=", "completion": "4"}, "prompt_completion") == [U("2+2="), A("4")]


def test_prompt_completion_conversational_lists() -> None:
    # TRL's conversational prompt-completion: both sides are message lists.
    record = {"prompt": [S("be brief"), U("2+2=")], "completion": [A("4")]}
    assert to_messages(record, "prompt_completion") == [S("be brief"), U("2+2="), A("4")]


def test_prompt_completion_mixed_list_and_string() -> None:
    with pytest.raises(FormatError) as info:
        to_messages({"prompt": "2+2=", "completion": [A("4")]}, "prompt_completion", where=WHERE)
    assert str(info.value) == f"{WHERE}: 'prompt' must be a list, got str"


# --- system prompt ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [U("q"), A("a")]}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"instruction": "q", "output": "a"}, "alpaca"),
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
    ],
)
def test_system_prompt_added_when_absent(record: dict, fmt: str) -> None:
    assert to_messages(record, fmt, system_prompt="Be nice.") == [S("Be nice."), U("q"), A("a")]
    assert to_messages(record, fmt) == [U("q"), A("a")]
    assert to_messages(record, fmt, system_prompt="") == [U("q"), A("a")]


def test_system_prompt_not_added_when_present() -> None:
    msgs = [U("q"), S("own system"), A("a")]
    assert to_messages({"messages": msgs}, "messages", system_prompt="Be nice.") == msgs
    sharegpt = {"conversations": [{"from": "system", "value": "own"}, {"from": "human", "value": "q"}]}
    assert to_messages(sharegpt, "sharegpt", system_prompt="Be nice.") == [S("own"), U("q")]


# --- records that do not fit -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("record", "kind"), [([1, 2], "list"), ("text", "str"), (None, "NoneType")])
def test_non_dict_record(record: object, kind: str) -> None:
    with pytest.raises(FormatError) as info:
        to_messages(record, "messages", where=WHERE)
    assert info.value.reason == "bad_format"
    assert str(info.value) == f"{WHERE}: expected a JSON object, got {kind}"


def test_missing_keys_name_missing_and_present() -> None:
    with pytest.raises(FormatError) as info:
        to_messages({"instruction": "i", "response": "r", "id": 1}, "alpaca", where=WHERE)
    assert info.value.reason == "bad_format"
    assert str(info.value) == f"{WHERE}: alpaca record lacks output (has id, instruction, response)"


def test_missing_keys_of_empty_record() -> None:
    with pytest.raises(FormatError) as info:
        to_messages({}, "prompt_completion", where=WHERE)
    assert str(info.value) == f"{WHERE}: prompt_completion record lacks prompt, completion (has no keys)"


def test_text_format_holds_no_conversation() -> None:
    with pytest.raises(FormatError) as info:
        to_messages({"text": "plain"}, "text", where=WHERE)
    assert info.value.reason == "bad_format"
    assert str(info.value) == f"{WHERE}: format 'text' holds no conversation"

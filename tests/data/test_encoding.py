"""``sftray.data.encoding.encode_conversation``: one raw record -> encoded fields or an exact drop reason (no Ray)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from testkit import A, U
from transformers import AutoTokenizer

from sftray.config import DataConfig
from sftray.data.encoding import encode_conversation
from sftray.models.tiny import CHATML_TEMPLATE, ensure_tiny_tokenizer

IGNORE = -100
WHERE = "f.jsonl:3"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # built once per module into a private cache (never the user's ~/.cache)
    return AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(tmp_path_factory.mktemp("sftray-cache")))


@pytest.fixture(scope="module")
def im_end(tok: Any) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


def encode(tok: Any, record: Any, fmt: str = "messages", **data: Any) -> dict[str, Any]:
    out = encode_conversation(record, tok, where=WHERE, fmt=fmt, data=DataConfig(**data))
    out.pop("messages", None)  # returned for curation; the tests here check the encoding
    return out


def assert_bad(out: dict[str, Any], reason: str) -> str:
    assert set(out) == {"reason", "error"}, out
    assert out["reason"] == reason, out
    assert WHERE in out["error"]
    return out["error"]


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) runs of trained positions."""
    runs, lo = [], None
    for i, x in enumerate([*labels, IGNORE]):
        if x != IGNORE and lo is None:
            lo = i
        elif x == IGNORE and lo is not None:
            runs.append((lo, i))
            lo = None
    return runs


def assert_labels_valid(out: dict[str, Any]) -> None:
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))


def test_tiny_tokenizer_is_what_the_tests_assume(tok: Any) -> None:
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.chat_template == CHATML_TEMPLATE


# --- bad inputs: exact reason, error names the row ---------------------------------------------------------------


def test_unknown_role(tok: Any) -> None:
    err = assert_bad(encode(tok, {"messages": [{"role": "tool", "content": "x"}, A("y")]}), "unknown_role")
    assert err == f"{WHERE}: message 0 has unknown role 'tool'; valid roles: system, user, assistant"


def test_sharegpt_unknown_from(tok: Any) -> None:
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    err = assert_bad(encode(tok, record, "sharegpt"), "unknown_role")
    assert "conversations[1] has unknown 'from' 'bot'" in err


def test_non_string_content(tok: Any) -> None:
    err = assert_bad(encode(tok, {"messages": [U(["a", "list"]), A("y")]}), "bad_content")
    assert err == f"{WHERE}: message 0 (user) content is a list, expected a string"


def test_missing_content(tok: Any) -> None:
    err = assert_bad(encode(tok, {"messages": [U("q"), {"role": "assistant"}]}), "bad_content")
    assert err == f"{WHERE}: message 1 (assistant) has no 'content'"


@pytest.mark.parametrize("content", ["", " \n\t "])
def test_empty_assistant(tok: Any, content: str) -> None:
    err = assert_bad(encode(tok, {"messages": [U("q"), A(content)]}), "empty_assistant")
    assert err == f"{WHERE}: message 1 (assistant) has empty content: nothing to train on"


def test_no_assistant(tok: Any) -> None:
    err = assert_bad(encode(tok, {"messages": [{"role": "system", "content": "s"}, U("q")]}), "no_assistant")
    assert err == f"{WHERE}: conversation has no assistant turn: nothing to train on"


def test_missing_format_keys(tok: Any) -> None:
    err = assert_bad(encode(tok, {"prompt": "q"}, "prompt_completion"), "bad_format")
    assert err == f"{WHERE}: prompt_completion record lacks completion (has prompt)"


@pytest.fixture(scope="module")
def strict_tok(tok: Any) -> Any:
    """A copy of the tiny tokenizer whose template rejects two adjacent turns of the same speaker."""
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{%- for message in messages %}"
        "{%- if not loop.first and message['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant') }}"
        "{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    assert tok.chat_template == CHATML_TEMPLATE  # the shared fixture is untouched
    return strict


def test_template_rejected(strict_tok: Any) -> None:
    ok = encode(strict_tok, {"messages": [U("q"), A("a")]})
    assert "input_ids" in ok  # the copy still encodes alternating conversations
    err = assert_bad(encode(strict_tok, {"messages": [U("q1"), U("q2"), A("a")]}), "template_rejected")
    assert err.startswith(f"{WHERE}: the chat template rejected the conversation: ")
    assert "Conversation roles must alternate user/assistant" in err


@pytest.mark.parametrize("token", ["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
@pytest.mark.parametrize("turn", [0, 1])
def test_special_token_text_in_content(tok: Any, token: str, turn: int) -> None:
    msgs = [U("question"), A("answer")]
    msgs[turn] = {**msgs[turn], "content": f"before {token} after"}
    err = assert_bad(encode(tok, {"messages": msgs}), "special_token_in_content")
    role = msgs[turn]["role"]
    assert err.startswith(f"{WHERE}: message {turn} ({role}) contains the special token {token!r} as text")


# --- overlength ---------------------------------------------------------------------------------------------------

TWO_TURNS = {"messages": [U("hello"), A("Hi there."), U("more"), A("Sure.")]}


def test_overlength_drop(tok: Any) -> None:
    n = len(encode(tok, TWO_TURNS)["input_ids"])
    assert n > 8
    err = assert_bad(encode(tok, TWO_TURNS, max_seq_len=n - 1, overlength="drop"), "too_long")
    assert err == f"{WHERE}: {n} tokens > data.max_seq_len={n - 1}"
    assert encode(tok, TWO_TURNS, max_seq_len=n, overlength="drop")["truncated"] is False


def test_overlength_truncate_untrains_cut_turn(tok: Any, im_end: int) -> None:
    full = encode(tok, TWO_TURNS)
    runs = trained_runs(full["labels"])
    assert len(runs) == 2
    (lo1, hi1), (lo2, hi2) = runs
    cut = hi2 - 2  # inside the second assistant turn
    assert lo2 < cut < hi2
    out = encode(tok, TWO_TURNS, max_seq_len=cut, overlength="truncate")
    assert out["truncated"] is True
    assert len(out["input_ids"]) == len(out["labels"]) == cut
    assert out["input_ids"] == full["input_ids"][:cut]
    assert_labels_valid(out)
    # The first turn stays trained, ending with <|im_end|>; nothing of the cut turn is trained.
    assert trained_runs(out["labels"]) == [(lo1, hi1)]
    assert out["labels"][hi1 - 1] == im_end
    assert out["labels"][:hi1] == full["labels"][:hi1]
    assert all(x == IGNORE for x in out["labels"][hi1:])


def test_overlength_truncate_nothing_complete_remains(tok: Any) -> None:
    full = encode(tok, TWO_TURNS)
    (lo1, hi1), _ = trained_runs(full["labels"])
    cut = hi1 - 1  # drops the first turn's <|im_end|>: no complete assistant turn is left
    assert cut >= 8
    err = assert_bad(encode(tok, TWO_TURNS, max_seq_len=cut, overlength="truncate"), "too_long")
    assert err == f"{WHERE}: empty loss mask after truncation to {cut} tokens: no complete assistant turn is trained"


# --- good records ----------------------------------------------------------------------------------------------------


def test_good_record_labels_every_assistant_turn(tok: Any, im_end: int) -> None:
    out = encode(tok, TWO_TURNS)
    assert out["truncated"] is False
    assert set(out) == {"input_ids", "labels", "truncated"}
    assert_labels_valid(out)
    text = tok.decode(out["input_ids"], skip_special_tokens=False)
    assert text == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
        "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\nSure.<|im_end|>\n"
    )
    runs = trained_runs(out["labels"])
    assert [tok.decode(out["input_ids"][lo:hi], skip_special_tokens=False) for lo, hi in runs] == [
        "Hi there.<|im_end|>",
        "Sure.<|im_end|>",
    ]
    assert all(out["labels"][hi - 1] == im_end for _, hi in runs)
    # <|im_end|> of the user turns is not trained
    user_ends = [i for i, t in enumerate(out["input_ids"]) if t == im_end and out["labels"][i] == IGNORE]
    assert len(user_ends) == 2


def test_good_record_last_assistant_only(tok: Any) -> None:
    out = encode(tok, TWO_TURNS, train_on="last_assistant")
    runs = trained_runs(out["labels"])
    assert [tok.decode(out["input_ids"][lo:hi], skip_special_tokens=False) for lo, hi in runs] == ["Sure.<|im_end|>"]


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [U("Add 2 and 3."), A("5")]}, "messages"),
        ({"conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]}, "sharegpt"),
        ({"instruction": "Add 2 and 3.", "output": "5"}, "alpaca"),
        ({"prompt": "Add 2 and 3.", "completion": "5"}, "prompt_completion"),
    ],
)
def test_system_prompt_inserted(tok: Any, record: dict, fmt: str) -> None:
    out = encode(tok, record, fmt, system_prompt="Be brief.")
    assert tok.decode(out["input_ids"], skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    ((lo, hi),) = trained_runs(out["labels"])
    assert tok.decode(out["input_ids"][lo:hi], skip_special_tokens=False) == "5<|im_end|>"
    without = encode(tok, record, fmt)
    assert "system" not in tok.decode(without["input_ids"], skip_special_tokens=False)


def test_system_prompt_not_inserted_when_present(tok: Any) -> None:
    record = {"messages": [{"role": "system", "content": "Own."}, U("q"), A("a")]}
    out = encode(tok, record, system_prompt="Be brief.")
    text = tok.decode(out["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nOwn.<|im_end|>\n<|im_start|>user\nq")
    assert "Be brief." not in text

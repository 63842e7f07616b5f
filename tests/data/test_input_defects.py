"""Regression tests of data-input defects: bad UTF-8, column mapping, first bad row, assistant-first, mixed folders."""

from __future__ import annotations

import json
import logging
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from testkit import A, U, write_jsonl
from transformers import AutoTokenizer

from sftray.config import DataConfig, MixConfig, SourceConfig, compose_config
from sftray.data.encoding import encode_conversation
from sftray.data.errors import DataError
from sftray.data.formats import to_messages
from sftray.data.sources import iter_file_records, resolve_source
from sftray.models.tiny import ensure_tiny_tokenizer

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

WHAT = "data.sources[0]"


def S(c: str) -> dict:
    return {"role": "system", "content": c}


def _resolve(path: str | Path, **kw: Any):
    return resolve_source(SourceConfig(path=str(path), **kw), cache_dir=Path("/nonexistent-cache"), what=WHAT)


def _read(src: Any) -> list[tuple[str, str, Any]]:
    """(where, fmt, record) of every record of a resolved file source, as the pipeline reads them."""
    from sftray.data.sources import iter_source_records

    return [
        (f"{p}:{row}", fmt, record)
        for p in src.paths
        for row, fmt, record in iter_source_records(src, p, Path(p).read_bytes())
    ]


# --- 1. invalid UTF-8 is bad input, never U+FFFD ------------------------------------------------------------------


def test_jsonl_invalid_utf8_line_is_bad_encoding() -> None:
    data = b'{"a": "ok"}\n{"a": "caf\xe9"}\n{"a": 3}\n'
    out = list(iter_file_records("/d/f.jsonl", data))
    assert [row for row, _ in out] == [1, 2, 3]
    assert out[0][1] == {"a": "ok"} and out[2][1] == {"a": 3}
    err = out[1][1]
    assert isinstance(err, DataError) and err.reason == "bad_encoding"
    assert str(err) == "/d/f.jsonl:2: not valid UTF-8 (byte 0xe9 at column 11)"


def test_txt_invalid_utf8_is_bad_encoding_at_its_line() -> None:
    out = list(iter_file_records("/d/doc.txt", b"line one\nline two \xff\nthree\n"))
    assert len(out) == 1
    row, err = out[0]
    assert row == 2
    assert isinstance(err, DataError) and err.reason == "bad_encoding"
    assert str(err) == "/d/doc.txt:2: not valid UTF-8 (byte 0xff at column 10)"


def test_json_invalid_utf8_is_bad_encoding_not_a_crash() -> None:
    out = list(iter_file_records("/d/x.json", b'[\n {"a": "ok"},\n {"a": "\xff"}\n]'))
    assert len(out) == 1
    row, err = out[0]
    assert row == 3
    assert isinstance(err, DataError) and err.reason == "bad_encoding"
    assert str(err).startswith("/d/x.json:3: not valid UTF-8")


def test_jsonl_line_separators_inside_strings_do_not_split_records() -> None:
    record = {"a": "one\u2028two\x85three"}
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    assert list(iter_file_records("x.jsonl", data)) == [(1, record)]


def test_detection_on_invalid_utf8_first_line_names_it(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"prompt": "\xff", "completion": "a"}\n')
    with pytest.raises(ValueError) as info:
        _resolve(f)
    assert str(info.value) == f"{WHAT}: cannot detect the format: {f}:1: not valid UTF-8 (byte 0xff at column 13)"


# --- 2. column mapping ------------------------------------------------------------------------------------------------


def test_hydra_accepts_columns_syntax(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            "data=files",
            "data.sources=[{path: x.jsonl, format: prompt_completion, columns: {prompt: question, completion: answer}}]",
            "data.val_sources=[{path: v.jsonl, format: sharegpt, columns: {conversations: messages, from: role, "
            "value: content}, roles: {human: user, bot: assistant}}]",
        ],
        base=tmp_path,
    )
    (src,) = cfg.data.sources
    assert (src.format, src.columns) == ("prompt_completion", {"prompt": "question", "completion": "answer"})
    (val,) = cfg.data.val_sources
    assert val.columns == {"conversations": "messages", "from": "role", "value": "content"}
    assert val.roles == {"human": "user", "bot": "assistant"}


def test_prompt_completion_columns(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "2", "id": 7}])
    src = _resolve(f, format="prompt_completion", columns={"prompt": "question", "completion": "answer"})
    ((where, fmt, record),) = _read(src)
    assert fmt == "prompt_completion"
    assert to_messages(record, fmt, where=where) == [U("1+1?"), A("2")]


def test_auto_detects_with_mapped_names(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1+1?", "answer": "2"}])
    src = _resolve(f, columns={"prompt": "question", "completion": "answer"})
    assert src.fmt == "prompt_completion"
    ((where, fmt, record),) = _read(src)
    assert to_messages(record, fmt, where=where) == [U("1+1?"), A("2")]


@pytest.mark.parametrize("fmt", ["alpaca", "auto"])
def test_alpaca_columns(tmp_path: Path, fmt: str) -> None:
    rows = [{"q": "Uppercase", "ctx": "abc", "a": "ABC"}, {"q": "Say hi", "a": "hi"}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    src = _resolve(f, format=fmt, columns={"instruction": "q", "input": "ctx", "output": "a"})
    assert src.fmt == "alpaca"
    got = [to_messages(r, fmt, where=w) for w, fmt, r in _read(src)]
    assert got == [[U("Uppercase\n\nabc"), A("ABC")], [U("Say hi"), A("hi")]]  # input stays optional


def test_messages_columns_with_role_and_content_keys(tmp_path: Path) -> None:
    rows = [{"dialog": [{"speaker": "human", "text": "q"}, {"speaker": "bot", "text": "a"}]}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    src = _resolve(
        f,
        columns={"messages": "dialog", "role": "speaker", "content": "text"},
        roles={"human": "user", "bot": "assistant"},
    )
    assert src.fmt == "messages"
    ((where, fmt, record),) = _read(src)
    assert to_messages(record, fmt, where=where) == [U("q"), A("a")]


def test_sharegpt_columns_and_roles(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "sys", "content": "s"},
                {"role": "human", "content": "q"},
                {"role": "bot", "content": "a"},
            ]
        }
    ]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    columns = {"conversations": "messages", "from": "role", "value": "content"}
    src = _resolve(f, columns=columns, roles={"bot": "assistant", "sys": "system"})
    assert src.fmt == "sharegpt"  # the list key is mapped: detection sees 'conversations', not 'messages'
    ((where, fmt, record),) = _read(src)
    assert to_messages(record, fmt, where=where) == [S("s"), U("q"), A("a")]


def test_wrong_column_name_lists_the_records_keys(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    src = _resolve(f, format="prompt_completion", columns={"prompt": "question", "completion": "answr"})
    ((where, _, err),) = _read(src)
    assert isinstance(err, DataError) and err.reason == "missing_column"
    assert str(err) == (f"{f}:1: no field 'answr' (columns: completion -> answr); the record has answer, question")


def test_wrong_turn_column_name_lists_the_turns_keys(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "a.jsonl", [{"messages": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}]}]
    )
    src = _resolve(f, format="messages", columns={"content": "txt"})
    ((_, _, err),) = _read(src)
    assert isinstance(err, DataError) and err.reason == "missing_column"
    assert str(err) == f"{f}:1: messages[0]: no field 'txt' (columns: content -> txt); it has role, text"


@pytest.mark.parametrize(
    ("fmt", "columns", "valid"),
    [
        ("prompt_completion", {"question": "q"}, "prompt, completion"),
        ("alpaca", {"prompt": "q"}, "instruction, input, output"),
        ("sharegpt", {"role": "r"}, "conversations, from, value"),
        ("messages", {"from": "r"}, "messages, role, content"),
    ],
)
def test_unknown_mapping_key_is_a_config_error(fmt: str, columns: dict, valid: str) -> None:
    key = next(iter(columns))
    for where, make in [
        ("data.sources[0]", lambda s: DataConfig(sources=[s])),
        ("data.val_sources[0]", lambda s: DataConfig(val_sources=[s])),
    ]:
        with pytest.raises(ValueError) as info:
            make(SourceConfig(path="x.jsonl", format=fmt, columns=columns))
        assert str(info.value) == f"{where}.columns: {key!r} is not a field of {fmt}; valid: {valid}"


def test_unknown_mapping_key_with_auto_lists_every_formats_fields() -> None:
    with pytest.raises(ValueError) as info:
        DataConfig(sources=[SourceConfig(path="x.jsonl", columns={"question": "q"})])
    assert str(info.value).startswith("data.sources[0].columns: 'question' is not a field of any chat format; valid: ")
    assert "prompt_completion: prompt, completion" in str(info.value)


def test_roles_must_name_a_role(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        _resolve(write_jsonl(tmp_path / "a.jsonl", [{"messages": [U("q"), A("a")]}]), roles={"gpt": "bot"})
    assert str(info.value) == f"{WHAT}.roles: 'gpt' -> 'bot'; a role is one of system, user, assistant"
    with pytest.raises(ValueError, match=r"^data.sources\[0\].roles: only messages and sharegpt records have roles"):
        DataConfig(sources=[SourceConfig(path="x.jsonl", format="alpaca", roles={"gpt": "assistant"})])


def test_text_source_column(tmp_path: Path) -> None:
    MixConfig(sources=[SourceConfig(path="x.jsonl", columns={"text": "body"})])
    with pytest.raises(ValueError, match=r"^mix.sources\[0\].columns: 'prompt' is not a field of text; valid: text$"):
        MixConfig(sources=[SourceConfig(path="x.jsonl", columns={"prompt": "body"})])
    f = write_jsonl(tmp_path / "c.jsonl", [{"body": "prose"}])
    src = resolve_source(
        SourceConfig(path=str(f), columns={"text": "body"}), cache_dir=tmp_path, what="mix.sources[0]", text=True
    )
    assert src.text_field == "body"


# --- 3. on_error=raise names the first bad row in file order ----------------------------------------------------------


def test_first_bad_row_is_in_file_then_numeric_line_order() -> None:
    from sftray.data.drops import first_bad_row

    wheres = ["/d/b.jsonl:1", "/d/a.jsonl:11", "/d/a.jsonl:2", "/d/a.jsonl:10", "hub[train] row 12", "hub[train] row 3"]
    meta = pd.DataFrame(
        {"where": wheres, "reason": ["invalid_json"] * len(wheres), "error": [f"{w}: bad" for w in wheres]}
    )
    assert first_bad_row(meta)["where"] == "/d/a.jsonl:2"
    assert first_bad_row(meta[meta["where"].str.startswith("hub")])["where"] == "hub[train] row 3"


# --- 4. assistant-first conversations ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(tmp_path_factory.mktemp("sftray-cache")))


@pytest.mark.parametrize("messages", [[A("hello"), U("q"), A("a")], [S("s"), A("hello"), U("q"), A("a")]])
def test_assistant_first_has_its_own_reason(tok: Any, messages: list[dict]) -> None:
    out = encode_conversation({"messages": messages}, tok, where="f.jsonl:3", fmt="messages", data=DataConfig())
    assert out["reason"] == "assistant_first", out
    assert out["error"] == (
        f"f.jsonl:3: message {len(messages) - 3} (assistant) starts the conversation: "
        "there is no prompt for it to answer"
    )


def test_assistant_first_is_fine_when_training_on_everything(tok: Any) -> None:
    record = {"messages": [A("hi"), U("q"), A("a")]}
    out = encode_conversation(record, tok, where="f.jsonl:3", fmt="messages", data=DataConfig(train_on="all"))
    assert "input_ids" in out, out


# --- 5. folders of mixed formats, ignored files -----------------------------------------------------------------------


def test_folder_detects_each_files_format(tmp_path: Path) -> None:
    d = tmp_path / "chats"
    write_jsonl(d / "a.jsonl", [{"messages": [U("q1"), A("a1")]}])
    write_jsonl(d / "b.jsonl", [{"instruction": "q2", "output": "a2"}])
    write_jsonl(d / "c.jsonl", [{"conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]}])
    (d / "d.jsonl").write_text("")
    src = _resolve(d)
    assert src.fmts == ("messages", "alpaca", "sharegpt", "messages")  # an empty file takes the first format
    assert src.fmt == "messages"
    got = [(fmt, to_messages(r, fmt, where=w)) for w, fmt, r in _read(src) if not isinstance(r, DataError)]
    assert got == [
        ("messages", [U("q1"), A("a1")]),
        ("alpaca", [U("q2"), A("a2")]),
        ("sharegpt", [U("q3"), A("a3")]),
    ]


def test_explicit_format_applies_to_every_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"messages": [U("q1"), A("a1")]}])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q2", "output": "a2"}])
    src = _resolve(tmp_path, format="messages")
    assert src.fmts == ("messages", "messages")
    assert [fmt for _, fmt, _ in _read(src)] == ["messages", "messages"]


def test_folder_reports_ignored_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "chats"
    write_jsonl(d / "a.jsonl", [{"messages": [U("q"), A("a")]}])
    (d / "notes.txt").write_text("prose")
    (d / "sub").mkdir()
    (d / "sub" / "table.csv").write_text("a,b")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")  # hidden: never data, never reported
    with caplog.at_level(logging.WARNING, logger="sftray.data.sources"):
        src = _resolve(d)
    assert src.paths == (str(d / "a.jsonl"),)
    assert src.ignored == (str(d / "notes.txt"), str(d / "sub" / "table.csv"))
    (record,) = [r for r in caplog.records if r.name == "sftray.data.sources"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"{WHAT}: ignoring 2 file(s) of folder {str(d)!r} that no reader takes (a chat source reads "
        f".jsonl, .ndjson, .json, .parquet): {d / 'notes.txt'}, {d / 'sub' / 'table.csv'}"
    )


def test_text_folder_reads_txt_and_ignores_the_rest(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text("prose")
    (tmp_path / "table.csv").write_text("a,b")
    src = resolve_source(SourceConfig(path=str(tmp_path)), cache_dir=tmp_path, what="mix.sources[0]", text=True)
    assert src.paths == (str(tmp_path / "doc.txt"),) and src.ignored == (str(tmp_path / "table.csv"),)


def test_folder_file_with_unreadable_first_record_takes_the_first_format(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"messages": [U("q"), A("a")]}])
    (tmp_path / "b.jsonl").write_text("{oops\n" + json.dumps({"messages": [U("q2"), A("a2")]}) + "\n")
    with caplog.at_level(logging.WARNING, logger="sftray.data.sources"):
        src = _resolve(tmp_path)
    assert src.fmts == ("messages", "messages")  # its rows are then read (and fail) one by one, by line
    assert f"reading {tmp_path / 'b.jsonl'} as messages, row by row" in caplog.text
    bad = [(w, r) for w, _, r in _read(src) if isinstance(r, DataError)]
    assert [(w, r.reason) for w, r in bad] == [(f"{tmp_path / 'b.jsonl'}:1", "invalid_json")]


def test_preview_reads_mapped_columns_like_the_pipeline(tmp_path: Path, cache_dir: Path, capsys) -> None:

    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"{i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    source = f"data.sources=[{{path: '{gsm}', format: prompt_completion, columns: {{prompt: question, completion: answer}}}}]"
    assert main(["preview", "n=2", f"paths.cache_dir={cache_dir}", "data=files", source]) == 0
    out = capsys.readouterr().out
    assert ": ERROR (" not in out and len(re.findall(r"^--- .*: \d+ tokens, \d+ trained$", out, re.M)) == 2
    assert "1 + 1?" in out and "{+2<|im_end|>+}" in out

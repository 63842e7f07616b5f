"""``sftray.data.sources``: reading file bytes into located records, and resolving configured sources."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftray.config import SourceConfig
from sftray.data.errors import DataError
from sftray.data.sources import iter_file_records, load_hub_split, record_text, resolve_source

WHAT = "data.sources[0]"

CHAT_RECORDS = {
    "messages": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "alpaca": {"instruction": "q", "input": "", "output": "a"},
    "prompt_completion": {"prompt": "q", "completion": "a"},
}


def _parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _write(path: Path, fmt_kind: str, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt_kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt_kind == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_bytes(_parquet_bytes(rows))
    return path


def _resolve(path: str | Path, *, cache_dir: Path | None = None, text: bool = False, **kw):
    return resolve_source(
        SourceConfig(path=str(path), **kw), cache_dir=cache_dir or Path("/nonexistent-cache"), what=WHAT, text=text
    )


# --- iter_file_records: JSONL ------------------------------------------------------------------------------------


def test_jsonl_rows_are_line_numbers_and_blank_lines_skipped() -> None:
    data = b'{"a": 1}\n\n   \n{"a": 2}\r\n{"a": 3}'
    assert list(iter_file_records("x.jsonl", data)) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]


def test_ndjson_is_jsonl() -> None:
    assert list(iter_file_records("x.NDJSON", b'{"a": 1}\n[2]\n')) == [(1, {"a": 1}), (2, [2])]


def test_jsonl_invalid_line_is_yielded_as_error_and_reading_continues() -> None:
    data = b'{"a": 1}\n{bad\n{"a": 3}\n'
    out = list(iter_file_records("/d/f.jsonl", data))
    assert [row for row, _ in out] == [1, 2, 3]
    assert out[0][1] == {"a": 1} and out[2][1] == {"a": 3}
    err = out[1][1]
    assert isinstance(err, DataError)
    assert err.reason == "invalid_json"
    assert str(err) == "/d/f.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"


def test_jsonl_error_position_reads_once() -> None:
    """json's messages that end in "at" ("Unterminated string starting at") get the column without a second "at"."""
    out = list(iter_file_records("/d/f.jsonl", b'{"a": "open\n'))
    assert str(out[0][1]) == "/d/f.jsonl:1: not valid JSON (Unterminated string starting at column 7)"


# --- iter_file_records: JSON ---------------------------------------------------------------------------------------


def test_json_array() -> None:
    assert list(iter_file_records("x.json", b'[{"a": 1}, {"a": 2}]')) == [(1, {"a": 1}), (2, {"a": 2})]


def test_json_data_key() -> None:
    assert list(iter_file_records("x.json", b'{"data": [{"a": 1}], "version": 2}')) == [(1, {"a": 1})]


def test_json_invalid_names_line() -> None:
    out = list(iter_file_records("/d/x.json", b'[\n  {"a": 1},\n  {"a": }\n]'))
    assert len(out) == 1
    row, err = out[0]
    assert row == 3
    assert isinstance(err, DataError) and err.reason == "invalid_json"
    assert str(err) == "/d/x.json:3: not valid JSON (Expecting value)"


@pytest.mark.parametrize("doc", [b'{"rows": [1]}', b'"a string"', b'{"data": {"a": 1}}', b"42"])
def test_json_not_an_array(doc: bytes) -> None:
    out = list(iter_file_records("/d/x.json", doc))
    assert len(out) == 1
    row, err = out[0]
    assert row == 1
    assert isinstance(err, DataError) and err.reason == "bad_format"
    assert str(err) == '/d/x.json: expected a JSON array of records (or {"data": [...]})'


# --- iter_file_records: Parquet, text, empty, unsupported -------------------------------------------------------------


def test_parquet_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    path = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert list(iter_file_records(str(path), path.read_bytes())) == [(1, rows[0]), (2, rows[1])]


def test_txt_is_one_document() -> None:
    data = "line one\n\nline two é\n".encode()
    assert list(iter_file_records("doc.txt", data)) == [(1, {"text": "line one\n\nline two é\n"})]


@pytest.mark.parametrize("name", ["x.jsonl", "x.json", "x.parquet", "x.txt"])
@pytest.mark.parametrize("data", [b"", b"  \n\n\t"])
def test_empty_file(name: str, data: bytes) -> None:
    out = list(iter_file_records(f"/d/{name}", data))
    assert len(out) == 1
    row, err = out[0]
    assert row == 0
    assert isinstance(err, DataError) and err.reason == "empty_file"
    assert str(err) == f"/d/{name}: file is empty"


def test_unsupported_suffix() -> None:
    out = list(iter_file_records("/d/x.csv", b"a,b\n1,2\n"))
    assert len(out) == 1
    row, err = out[0]
    assert row == 0
    assert isinstance(err, DataError) and err.reason == "bad_row"
    assert str(err) == "/d/x.csv: unsupported file type '.csv'; use one of .jsonl, .ndjson, .json, .parquet, .txt"


# --- resolve_source: local files -----------------------------------------------------------------------------------


def test_resolve_single_file(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.jsonl", "jsonl", [CHAT_RECORDS["messages"]])
    src = _resolve(f)
    assert src.kind == "files"
    assert src.label == str(f)
    assert src.paths == (str(f.resolve()),)
    assert src.fmt == "messages"


def test_resolve_folder_collects_known_types_recursively_sorted(tmp_path: Path) -> None:
    d = tmp_path / "chats"
    _write(d / "b.jsonl", "jsonl", [CHAT_RECORDS["sharegpt"]])
    _write(d / "a.json", "json", [CHAT_RECORDS["alpaca"]])
    _write(d / "sub" / "deeper" / "c.parquet", "parquet", [CHAT_RECORDS["alpaca"]])
    (d / "README.md").write_text("not data")
    (d / "sub" / "notes.csv").write_text("a,b")
    src = _resolve(d)
    assert src.kind == "files"
    assert src.paths == tuple(str(p.resolve()) for p in [d / "a.json", d / "b.jsonl", d / "sub/deeper/c.parquet"])
    assert src.fmt == "alpaca"  # detected from the first file (a.json), not b.jsonl


def test_resolve_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "only.md").write_text("x")
    with pytest.raises(FileNotFoundError) as info:
        _resolve(tmp_path)
    assert str(info.value) == f"{WHAT}: folder {str(tmp_path)!r} has no .jsonl, .ndjson, .json, .parquet files"


def test_resolve_glob(tmp_path: Path) -> None:
    for name in ["b.jsonl", "a.jsonl", "sub/c.jsonl"]:
        _write(tmp_path / name, "jsonl", [CHAT_RECORDS["prompt_completion"]])
    _write(tmp_path / "x.json", "json", [CHAT_RECORDS["messages"]])
    src = _resolve(tmp_path / "*.jsonl")
    assert src.paths == (str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert src.fmt == "prompt_completion"
    deep = _resolve(f"{tmp_path}/**/*.jsonl")
    assert deep.paths == tuple(str(tmp_path / n) for n in ["a.jsonl", "b.jsonl", "sub/c.jsonl"])


def test_resolve_glob_no_match(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        _resolve(pattern)
    assert str(info.value) == f"{WHAT}: no files match {pattern!r}"


def test_resolve_glob_with_unsupported_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", "jsonl", [CHAT_RECORDS["messages"]])
    (tmp_path / "b.csv").write_text("a,b")
    with pytest.raises(ValueError) as info:
        _resolve(tmp_path / "*")
    assert str(info.value) == (
        f"{WHAT}: unsupported file type of {str(tmp_path / 'b.csv')!r}; use one of .jsonl, .ndjson, .json, .parquet"
    )


@pytest.mark.parametrize("name", ["missing.jsonl", "no/such/dir/x.jsonl", "gone/"])
def test_resolve_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / name)
    with pytest.raises(FileNotFoundError) as info:
        _resolve(path)
    assert str(info.value) == f"{WHAT}: no such file or folder: {path!r} (cwd: {tmp_path})"


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("fmt", sorted(CHAT_RECORDS))
def test_resolve_detects_each_chat_format(tmp_path: Path, kind: str, fmt: str) -> None:
    f = _write(tmp_path / f"data.{kind}", kind, [CHAT_RECORDS[fmt], CHAT_RECORDS["messages"]])
    assert _resolve(f).fmt == fmt


def test_resolve_detection_skips_leading_blank_lines_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("\n\n" + json.dumps(CHAT_RECORDS["sharegpt"]) + "\n")
    assert _resolve(tmp_path).fmt == "sharegpt"


def test_resolve_detection_first_line_invalid(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text("{oops\n" + json.dumps(CHAT_RECORDS["alpaca"]) + "\n")
    with pytest.raises(ValueError) as info:
        _resolve(f)
    assert str(info.value) == (
        f"{WHAT}: cannot detect the format: {f}:1: "
        "not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    )


def test_resolve_detection_unknown_keys(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.jsonl", "jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        _resolve(f)
    assert info.value.reason == "unknown_format"
    assert str(info.value).startswith(f"{WHAT}: {f}:1: cannot detect the format from keys ['answer', 'question']")


def test_resolve_detection_non_object_first_record(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.json", "json", [[1, 2]])
    with pytest.raises(ValueError) as info:
        _resolve(f)
    assert str(info.value) == f"{WHAT}: {f}:1: expected a JSON object, got list"


def test_resolve_every_file_empty(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n\n")
    with pytest.raises(ValueError) as info:
        _resolve(tmp_path / "a.jsonl")
    assert str(info.value) == f"{WHAT}: every file is empty: {tmp_path / 'a.jsonl'}"


def test_resolve_explicit_format_skips_detection(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text("{not json at all\n")
    assert _resolve(f, format="sharegpt").fmt == "sharegpt"


def test_resolve_txt_as_chat_source(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("some prose")
    with pytest.raises(ValueError) as info:
        _resolve(f)
    assert str(info.value) == f"{WHAT}: {f} is plain text; conversations need JSONL, JSON or Parquet"


def test_resolve_explicit_text_format_for_chat_source(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.jsonl", "jsonl", [{"text": "t"}])
    with pytest.raises(ValueError) as info:
        _resolve(f, format="text")
    assert str(info.value) == f"{WHAT}: format 'text' is for mix.sources; conversations need a chat format"


def test_resolve_autodetected_text_for_chat_source_fails_early(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.jsonl", "jsonl", [{"text": "t"}])
    with pytest.raises(ValueError, match="conversations need a chat format"):
        _resolve(f)


def test_resolve_text_mode(tmp_path: Path) -> None:
    txt = tmp_path / "doc.txt"
    txt.write_text("prose")
    jsonl = _write(tmp_path / "rows.jsonl", "jsonl", [CHAT_RECORDS["messages"]])
    assert _resolve(txt, text=True).fmt == "text"
    # text=True wins over a detectable chat format and over the configured format
    src = _resolve(jsonl, text=True, format="messages", text_field="body")
    assert (src.fmt, src.kind, src.text_field) == ("text", "files", "body")


def test_resolve_builtin_demo_into_cache(tmp_path: Path) -> None:
    src = _resolve("builtin:demo", cache_dir=tmp_path)
    expected = tmp_path / "builtin" / "demo-train.jsonl"
    assert src.paths == (str(expected),)
    assert src.label == "builtin:demo"
    assert src.kind == "files" and src.fmt == "messages"
    assert expected.is_file()
    pydoc = _resolve("builtin:pydoc_topics", cache_dir=tmp_path, text=True)
    assert pydoc.paths == (str(tmp_path / "builtin" / "pydoc_topics_train.txt"),) and pydoc.fmt == "text"


def test_resolve_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^unknown builtin dataset 'builtin:nope'; valid names: builtin:demo, "):
        _resolve("builtin:nope", cache_dir=tmp_path)


# --- resolve_source: hub ---------------------------------------------------------------------------------------------


def test_resolve_hf_prefix_is_hub_without_loading(tmp_path: Path) -> None:
    src = _resolve("hf:org/name", format="sharegpt", split="test", subset="en", text_field="body")
    assert src.kind == "hub"
    assert src.label == "hf:org/name"
    assert src.paths == ("org/name",)
    assert (src.fmt, src.split, src.subset, src.text_field) == ("sharegpt", "test", "en", "body")
    assert _resolve("hf:org/name", text=True).fmt == "text"


def test_resolve_bare_hub_id_when_no_such_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    src = _resolve("org/name", format="alpaca")
    assert (src.kind, src.paths, src.fmt) == ("hub", ("org/name",), "alpaca")
    # the same name as an existing local folder is read as files
    _write(tmp_path / "org" / "name" / "a.jsonl", "jsonl", [CHAT_RECORDS["messages"]])
    local = _resolve("org/name")
    assert (local.kind, local.paths, local.fmt) == ("files", (str(tmp_path / "org/name/a.jsonl"),), "messages")


@pytest.fixture
def offline_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` offline and caching under tmp_path (its config is read at import, so patch both)."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_hf_local_folder_detects_format_and_loads(tmp_path: Path, offline_datasets: None) -> None:
    folder = tmp_path / "my_dataset"
    rows = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Reverse", "input": "abc", "output": "cba"},
    ]
    _write(folder / "train.jsonl", "jsonl", rows)
    src = _resolve(f"hf:{folder}")
    assert src.kind == "hub"
    assert src.paths == (str(folder),)
    assert src.fmt == "alpaca"  # detected from the first row through datasets.load_dataset
    ds = load_hub_split(src)
    assert len(ds) == 2
    assert [dict(r) for r in ds] == rows


# --- record_text ------------------------------------------------------------------------------------------------------


def test_record_text_ok() -> None:
    assert record_text({"body": "hello", "text": "other"}, text_field="body", where="w") == "hello"


@pytest.mark.parametrize(
    ("record", "found"),
    [({"content": "x"}, "['content']"), ({"text": 5, "id": 1}, "['id', 'text']"), (["x"], "list")],
)
def test_record_text_missing_or_non_string(record: object, found: str) -> None:
    with pytest.raises(DataError) as info:
        record_text(record, text_field="text", where="corpus.jsonl:4")
    assert info.value.reason == "bad_content"
    assert str(info.value) == f"corpus.jsonl:4: no string field 'text' (found {found})"

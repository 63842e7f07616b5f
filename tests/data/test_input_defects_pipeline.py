"""The data-input regressions through the real Ray Data pipeline: mixed-format folders, column mapping, bad UTF-8,
assistant-first conversations and the first bad row named under on_error=raise, on inputs of several blocks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit import A, U, prep_config, sft_sequences
from transformers import AutoTokenizer

from sftray.data.chat import encode_chat
from sftray.data.errors import DataError
from sftray.data.formats import to_messages
from sftray.recipes.prep import prep

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(tmp: Path, cache_dir: Path, sources: str, *extra: str):
    return prep_config(
        tmp, cache_dir, "data=files", f"data.sources={sources}", "data.max_seq_len=128", "mix=none", *extra
    )


def test_mixed_folder_mapped_columns_and_bad_rows(ray_local, cache_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    expected: list[tuple[str, dict]] = []  # (format, canonical record) of every good conversation
    lines = []
    for i in range(1500):
        if i % 300 == 7:
            lines.append(
                b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}'
            )
        elif i % 300 == 8:
            lines.append(json.dumps({"messages": [A("Hello!"), U(f"q{i}"), A(f"a{i}")]}).encode())
        else:
            record = {"messages": [U(f"What is {i} plus 1?"), A(str(i + 1))]}
            lines.append(json.dumps(record).encode())
            expected.append(("messages", record))
    (folder / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    alpaca = [{"instruction": "Uppercase the word.", "input": f"w{i}", "output": f"W{i}"} for i in range(1000)]
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    expected += [("alpaca", r) for r in alpaca]
    pc = [{"prompt": f"Count to {i}.", "completion": " ".join(map(str, range(i % 5 + 1)))} for i in range(500)]
    pq.write_table(pa.Table.from_pylist(pc), folder / "c.parquet")
    expected += [("prompt_completion", r) for r in pc]
    (folder / "notes.txt").write_text("not a conversation")
    (folder / "table.csv").write_text("a,b\n1,2\n")
    gsm = [{"question": f"{i} + {i}?", "answer": str(2 * i), "id": i} for i in range(1000)]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    expected += [("prompt_completion", {"prompt": r["question"], "completion": r["answer"]}) for r in gsm]

    sources = (
        f"[{{path: '{folder}'}}, {{path: '{tmp_path / 'gsm8k.jsonl'}', format: prompt_completion, "
        "columns: {prompt: question, completion: answer}}]"
    )
    prepared = prep(_cfg(tmp_path, cache_dir, sources, "data.on_error=drop"))

    report = prepared.report
    assert report["drops"] == {"bad_encoding": 5, "assistant_first": 5}
    folder_report = report["sources"][0]
    assert folder_report["formats"] == ["alpaca", "messages", "prompt_completion"]
    assert sorted(Path(f).name for f in folder_report["ignored_files"]) == ["notes.txt", "table.csv"]
    assert report["conversations"]["in"] == 1500 + 1000 + 500 + 1000
    assert report["conversations"]["train"] + report["conversations"]["val"] == len(expected)
    drops = [json.loads(line) for line in (prepared.out_dir / "drops.jsonl").read_text().splitlines()]
    assert {d["where"] for d in drops if d["reason"] == "bad_encoding"} == {
        f"{folder / 'a.jsonl'}:{i + 1}" for i in range(1500) if i % 300 == 7
    }
    assert all("no prompt for it to answer" in d["error"] for d in drops if d["reason"] == "assistant_first")
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    want = Counter(tuple(encode_chat(to_messages(r, fmt), tok)["input_ids"]) for fmt, r in expected)
    assert sft_sequences(prepared) == want  # every file read in its own format, every mapped record intact
    assert "\ufffd" not in json.dumps(drops)


def test_raise_names_the_first_bad_row_in_line_order(ray_local, cache_dir, tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps({"messages": [U(f"Add {i} and {i}."), A(str(2 * i))]}) for i in range(3000)]
    for lineno in (2, 11, 2500):
        lines[lineno - 1] = '{"messages": [oops]}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        prep(_cfg(tmp_path, cache_dir, f"[{{path: '{path}'}}]"))
    assert str(err.value).startswith(f"{path}:2: not valid JSON")
    assert "(2 more bad conversations)" in str(err.value)

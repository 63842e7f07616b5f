"""``sftray.data.probe_file``: the one reader of a generation-probe file, for eval's probes and dedup's
duplicate_of_eval check: every record kind, the ``columns`` mapping, and errors naming file and line (pure)."""

from __future__ import annotations

import pytest
from testkit import write_jsonl

from sftray.data.probe_file import read_probes


def test_every_record_kind_gives_the_conversation_and_its_reference(tmp_path):
    path = write_jsonl(
        tmp_path / "probes.jsonl",
        [
            {"prompt": "2+2?", "reference": "4"},
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "3+3?"},
                ],
                "reference": "6",
                "format": r"\d+",
            },
            {"prompt": "4+4?"},  # no reference: compliance only
            {"messages": [{"role": "user", "content": "5+5?"}, {"role": "assistant", "content": "10"}]},
            {"instruction": "Add", "input": "6 and 6", "output": "12"},
        ],
    )
    probes = read_probes(path, columns={}, system_prompt="Be brief.")
    assert [p.reference for p in probes] == ["4", "6", None, "10", "12"]
    assert [p.messages[-1]["content"] for p in probes] == ["2+2?", "3+3?", "4+4?", "5+5?", "Add\n\n6 and 6"]
    assert all(p.messages[0] == {"role": "system", "content": "Be brief."} for p in probes)
    assert probes[1].format == r"\d+" and probes[0].format is None
    assert [p.where for p in probes] == [f"{path}:{n}" for n in range(1, 6)]
    # The exchange dedup compares with training rows: the conversation and its reference as the assistant's turn.
    assert probes[1].exchange()[-2:] == [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    assert probes[2].exchange() is None


def test_columns_map_a_probe_files_own_names(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"question": "7+7?", "answer": "14\n#### 14"}] * 2)
    for columns in ({"prompt": "question", "reference": "answer"}, {"prompt": "question", "completion": "answer"}):
        (probe, _) = read_probes(path, columns=columns, system_prompt=None)
        assert probe.messages == [{"role": "user", "content": "7+7?"}] and probe.reference == "14\n#### 14"
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": [{"speaker": "user", "text": "8+8?"}], "gold": "16"}])
    (probe,) = read_probes(
        chat,
        columns={"messages": "dialog", "role": "speaker", "content": "text", "reference": "gold"},
        system_prompt=None,
    )
    assert probe.messages == [{"role": "user", "content": "8+8?"}] and probe.reference == "16"
    assert len(read_probes(path, columns={"prompt": "question"}, system_prompt=None, limit=1)) == 1


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        (['{"prompt": "a"}', "not json"], {}, r"probes.jsonl:2: not valid JSON"),
        (
            [{"prompt": "a"}, {"question": "b", "answer": "c"}],
            {},
            r"probes.jsonl:2: a probe needs 'prompt' \(string\) or 'messages'.*has answer, question.*data.probe_columns",
        ),
        ([{"question": "b"}], {"prompt": "query"}, r"probes.jsonl:1: no field 'query' \(columns: prompt -> query\)"),
        ([[1, 2]], {}, r"probes.jsonl:1: expected a JSON object, got list"),
        ([{"prompt": "a", "format": "([a-z"}], {}, r"probes.jsonl:1: 'format' is not a regular expression"),
        ([{"prompt": "a", "reference": 4}], {}, r"probes.jsonl:1: 'reference' must be a string, got int"),
        ([{"messages": [], "reference": "a"}], {}, r"probes.jsonl:1: the probe has no turn for the model to answer"),
        ([], {}, r"probes.jsonl: no probes"),
    ],
)
def test_a_bad_probe_file_fails_naming_file_and_line(tmp_path, rows, columns, message):
    path = write_jsonl(tmp_path / "probes.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        read_probes(path, columns=columns, system_prompt=None)

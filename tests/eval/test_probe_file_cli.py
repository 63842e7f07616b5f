"""A probe file is read before Ray starts: ``sftray train`` with a probe that has no prompt fails at once, naming
the file and line, and a GSM8K-style file reads through ``data.probe_columns`` (no Ray in this module)."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = pytest.mark.usefixtures("ray_untouched")  # every command here fails before init_ray


@pytest.fixture
def files(tmp_path, write_sums, cache_dir):
    chats = write_sums(tmp_path / "chats.jsonl", range(40))
    gsm8k = tmp_path / "gsm8k_test.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(5)]
    rows[3] = {"query": "What is 3 + 3?", "answer": "#### 6"}  # a line without the mapped prompt
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path / 'out'}",
        "data=files",
        f"data.sources=[{{path:'{chats}'}}]",
    ], gsm8k


@pytest.mark.parametrize("command", ["train", "sweep", "prep"])
def test_a_probe_without_a_prompt_fails_before_ray_starts_naming_file_and_line(files, command, capsys):
    args, gsm8k = files
    assert main([command, *args, f"data.probes={gsm8k}"]) == 1
    err = capsys.readouterr().err
    assert f"{gsm8k}:1: a probe needs 'prompt' (string) or 'messages'" in err and "data.probe_columns" in err
    columns = "+data.probe_columns={prompt: question, reference: answer}"
    assert main([command, *args, f"data.probes={gsm8k}", columns]) == 1
    assert f"{gsm8k}:4: no field 'question' (columns: prompt -> question)" in capsys.readouterr().err


def test_an_answer_pattern_no_reference_matches_fails_before_ray_starts(files, capsys):
    args, gsm8k = files
    rows = [json.loads(line) for line in gsm8k.read_text().splitlines()]
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in rows if "question" in r))
    columns = "+data.probe_columns={prompt: question, reference: answer}"
    assert main(["train", *args, f"data.probes={gsm8k}", columns, "eval.answer_pattern='The answer is (\\d+)'"]) == 1
    err = capsys.readouterr().err
    assert f"eval.answer_pattern='The answer is (\\\\d+)' matches none of the 4 reference answers in {gsm8k}" in err

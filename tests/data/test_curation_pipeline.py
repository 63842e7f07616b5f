"""Curation through ``sftray prep`` on a real Ray: exact and near duplicates (train/val and probe overlap included),
length and shape filters, per-source weights. Every drop is checked by reason and by file:line.

The main file (3,000+ conversations, about 900 KB) spans several pieces, so duplicates are found across blocks.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from testkit import messages_record, write_jsonl

from sftray.data.packing import KIND_SFT

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N = 3000


def _answer(i: int, n: int = 40) -> str:
    # Words unique to row i: two rows share (almost) no 3-word shingle.
    return " ".join(f"w{i}x{k}" for k in range(n))


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """The constructed files and the lines each kind of drop must hit (1-based lines of train.jsonl)."""
    root = tmp_path_factory.mktemp("curation")
    val = [messages_record(f"Validation question {v}?", _answer(100_000 + v)) for v in range(50)]
    probes = [{"prompt": f"Probe question {p}?", "reference": f"probe answer {p}"} for p in range(5)]
    # A messages-style probe: its conversation and reference are one exchange to dedup against, like a prompt's.
    probes.append({"messages": [{"role": "user", "content": "Probe chat turn?"}], "reference": "probe chat answer"})
    rows = [messages_record(f"Question {i}: describe item {i} in detail.", _answer(i)) for i in range(N)]
    expect: dict[str, list[int]] = {"duplicate": [], "near": [], "duplicate_of_eval": []}

    def add(row: dict, kind: str | None = None) -> None:
        rows.append(row)
        if kind:
            expect[kind].append(len(rows))

    # Exact duplicates: case and whitespace differ, content does not (the first occurrences stay).
    add(messages_record("QUESTION 10:  describe item 10 in detail.", _answer(10).upper()), "duplicate")
    add(messages_record("Question 20: describe item 20\tin detail. ", "  " + _answer(20)), "duplicate")
    # A near duplicate: the last of 40 words changed (Jaccard of 3-word shingles 44/46 = 0.957 with its prompt).
    add(messages_record("Question 30: describe item 30 in detail.", _answer(30).rsplit(" ", 1)[0] + " changed"), "near")
    # Training copies of a validation row and of a probe (prompt + reference as one exchange).
    add(messages_record("validation question 3?", _answer(100_003)), "duplicate_of_eval")
    add(messages_record(probes[2]["prompt"], probes[2]["reference"]), "duplicate_of_eval")
    add(messages_record("Probe chat turn?", "probe chat answer"), "duplicate_of_eval")
    # Filters: 3 assistant turns; an answer of ~700 tokens; a 200-word prompt answered with one word.
    turns = [{"role": r, "content": f"turn {k} of row filters"} for k in range(3) for r in ("user", "assistant")]
    add({"messages": turns})
    add(messages_record("Long answer please.", _answer(9_000, 120)))
    add(messages_record(" ".join(f"p{k}" for k in range(200)), "yes"))
    expect["filters"] = [len(rows) - 2, len(rows) - 1, len(rows)]
    other = [messages_record(f"Other source question {j}?", _answer(50_000 + j, 10)) for j in range(600)]
    return {
        "train": write_jsonl(root / "train.jsonl", rows),
        "val": write_jsonl(root / "val.jsonl", val),
        "probes": write_jsonl(root / "probes.jsonl", probes),
        "other": write_jsonl(root / "other.jsonl", other),
        "expect": expect,
        "root": root,
    }


def _drops(folder: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in (folder / "drops.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.setdefault(d["reason"], []).append(int(d["where"].rsplit(":", 1)[1]))
    return {k: sorted(v) for k, v in out.items()}


def _sft_tokens(folder: Path) -> int:
    table = pq.read_table(sorted((folder / "train").glob("*.parquet")))
    return sum(
        n
        for lens, kinds in zip(table["seq_lens"].to_pylist(), table["seq_kinds"].to_pylist())
        for n, k in zip(lens, kinds)
        if k == KIND_SFT
    )


def _prep(curated, cache_dir, capsys, *overrides: str) -> tuple[Path, dict]:
    """``sftray prep`` of the constructed files with ``overrides``: the new prepared folder and its report."""
    out = curated["root"] / "out"
    before = set((out / "data").iterdir()) if (out / "data").is_dir() else set()
    args = [
        "prep",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={out}",
        "data=files",
        f"data.sources=[{{path:'{curated['train']}'}}]",
        f"data.val_sources=[{{path:'{curated['val']}'}}]",
        f"data.probes={curated['probes']}",
        "data.max_seq_len=1024",
        "mix=none",
        *overrides,
    ]
    assert main(args) == 0
    curated["printed"] = capsys.readouterr().out  # the summary sftray prep printed
    (folder,) = set((out / "data").iterdir()) - before
    return folder, json.loads((folder / "report.json").read_text())


def test_exact_dedup_filters_and_weights_drop_the_right_rows(ray_local, cache_dir, curated, capsys):
    folder, report = _prep(
        curated,
        cache_dir,
        capsys,
        "data.dedup=exact",
        "data.max_turns=2",
        "data.max_assistant_tokens=400",  # the 40-word answers hold ~230 tokens, the long one ~700
        "data.min_assistant_ratio=0.05",
        f"data.sources=[{{path:'{curated['train']}',weight:2.0}},{{path:'{curated['other']}',weight:0.5,max_rows:400}}]",
    )
    expect = curated["expect"]
    drops = _drops(folder)
    assert drops["duplicate"] == expect["duplicate"]  # the near copy is not an exact duplicate
    assert drops["duplicate_of_eval"] == expect["duplicate_of_eval"]
    assert [drops[r][0] for r in ("too_many_turns", "too_many_assistant_tokens", "low_assistant_ratio")] == expect[
        "filters"
    ]
    assert report["drops"] == {k: len(v) for k, v in drops.items()}
    assert sum(report["drops"].values()) == 8

    # Weights: each source's achieved share of SFT training tokens within 1 point of its target, and the rows
    # hold exactly those tokens (the weight-2 source twice over).
    train_src, other_src = report["sources"][:2]
    for s in (train_src, other_src):
        assert abs(s["token_share"] - s["token_share_target"]) < 0.01, s
    assert 380 <= other_src["train_rows_unused"] <= 420  # max_rows=400 of 600, then about half of those by tokens
    assert train_src["train_copies"] == 2 * (N + 9 - 8)
    assert _sft_tokens(folder) == train_src["train_tokens"] + other_src["train_tokens"]
    # The printed summary says what the training split takes, and no "max_rows None" or "0.00%" mix.
    copies, unused = train_src["train_copies"] + other_src["train_copies"], other_src["train_rows_unused"]
    printed = curated["printed"]
    assert (
        f"training takes {copies} SFT examples from the {report['conversations']['train']} train conversations: "
        in (printed)
    )
    assert f": {unused} unused, " in printed
    assert "max_rows None" not in printed and "max_rows 400)" in printed
    assert "pretraining mix: off (mix.ratio=0)" in printed


def test_near_dedup_also_finds_the_edited_copy(ray_local, cache_dir, curated, capsys):
    folder, report = _prep(curated, cache_dir, capsys, "data.dedup=near", "data.near_threshold=0.8")
    drops, expect = _drops(folder), curated["expect"]
    assert drops["duplicate"] == sorted(expect["duplicate"] + expect["near"])
    assert drops["duplicate_of_eval"] == expect["duplicate_of_eval"]
    assert report["conversations"]["train"] == N + 9 - 6  # only the duplicates went (no filters set)


def test_every_probe_shape_drops_its_training_copy_as_duplicate_of_eval(ray_local, cache_dir, tmp_path, capsys):
    """A training copy of a probe goes whatever the probe line's shape: a prompt, a messages-style probe with a
    reference, or a plain chat record whose last assistant turn is the reference (the last two were once left out
    of the check)."""
    probes = [
        {"prompt": "Probe prompt?", "reference": "prompt answer"},
        {"messages": [{"role": "user", "content": "Probe messages?"}], "reference": "messages answer"},
        messages_record("Probe chat record?", "chat record answer"),
    ]
    rows = [messages_record(f"Question {i}: describe item {i}.", _answer(i, 10)) for i in range(40)]
    rows += [messages_record("Probe prompt?", "prompt answer"), messages_record("Probe messages?", "messages answer")]
    rows += [messages_record("Probe chat record?", "chat record answer")]
    train, probe_file = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "probes.jsonl", probes)
    val = write_jsonl(
        tmp_path / "val.jsonl", [messages_record(f"Validation question {v}?", _answer(100 + v, 10)) for v in range(5)]
    )
    args = [
        "prep",
        f"paths.cache_dir={cache_dir}",
        f"paths.output_dir={tmp_path / 'out'}",
        "data=files",
        f"data.sources=[{{path:'{train}'}}]",
        f"data.probes={probe_file}",
        "data.dedup=exact",
        f"data.val_sources=[{{path:'{val}'}}]",  # every training row stays in train
        "mix=none",
    ]
    assert main(args) == 0
    capsys.readouterr()
    (folder,) = (tmp_path / "out" / "data").iterdir()
    assert _drops(folder).get("duplicate_of_eval") == [41, 42, 43]

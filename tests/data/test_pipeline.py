"""End-to-end tests of the Ray Data pipeline on a real local Ray: every format, drops, errors, mix ratio, determinism."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.metadata import entry_points
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit import prep_config
from transformers import AutoTokenizer

from sftray.data.builtin import resolve_builtin
from sftray.data.chat import IGNORE_INDEX, encode_chat
from sftray.data.errors import DataError
from sftray.data.formats import to_messages
from sftray.data.mixing import chunk_windows
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT
from sftray.data.prepared import load_prepared
from sftray.recipes.prep import prep

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _messages(i: int) -> list[dict]:
    turns = [
        {"role": "user", "content": f"What is {i} plus {i + 1}?"},
        {"role": "assistant", "content": f"{2 * i + 1}"},
    ]
    if i % 3 == 0:
        turns = [
            {"role": "system", "content": "Answer briefly."},
            *turns,
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": f"{4 * i + 2}"},
        ]
    return turns


def _write_sources(root: Path) -> dict[str, list]:
    """One small file per supported format and file type; returns the records by source path."""
    root.mkdir(parents=True, exist_ok=True)
    msgs = [{"messages": _messages(i)} for i in range(12)]
    (root / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in msgs))
    share = [
        {"conversations": [{"from": "human", "value": f"Reverse {w}"}, {"from": "gpt", "value": w[::-1]}]}
        for w in ("apple", "river", "stone", "cloud", "light", "grass")
    ]
    (root / "sharegpt.json").write_text(json.dumps(share))
    alpaca = [
        {"instruction": "Uppercase the word.", "input": w, "output": w.upper()}
        for w in ("tree", "lamp", "door", "bird", "fish", "moon")
    ]
    pq.write_table(pa.Table.from_pylist(alpaca), root / "alpaca.parquet")
    pc = [{"prompt": f"Count the letters in {w}.", "completion": str(len(w))} for w in ("a", "bb", "ccc", "dddd")]
    (root / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    hub = root / "hubdir"
    hub.mkdir(exist_ok=True)
    hub_rows = [{"messages": _messages(100 + i)} for i in range(5)]
    (hub / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hub_rows))
    return {
        str(root / "messages.jsonl"): [("messages", r) for r in msgs],
        str(root / "sharegpt.json"): [("sharegpt", r) for r in share],
        str(root / "alpaca.parquet"): [("alpaca", r) for r in alpaca],
        str(root / "pc.jsonl"): [("prompt_completion", r) for r in pc],
        f"hf:{hub}": [("messages", r) for r in hub_rows],
    }


def _cfg(tmp: Path, cache_dir: Path, sources: list[str], *extra: str):
    listed = ",".join("{path:'" + s + "'}" for s in sources)
    return prep_config(tmp, cache_dir, "data=files", f"data.sources=[{listed}]", *extra)


def _rows(folder: Path) -> list[dict]:
    return pq.read_table(folder).to_pylist() if any(folder.glob("*.parquet")) else []


def _segments(row: dict) -> list[tuple[int, list[int], list[int]]]:
    out, start = [], 0
    for n, kind in zip(row["seq_lens"], row["seq_kinds"]):
        out.append((kind, row["input_ids"][start : start + n], row["labels"][start : start + n]))
        start += n
    return out


@pytest.fixture(scope="module")
def formats_run(ray_local, cache_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    records = _write_sources(tmp / "in")
    cfg = _cfg(
        tmp,
        cache_dir,
        list(records),
        "data.max_seq_len=128",
        "mix.ratio=0.2",
        "data.val_fraction=0.25",
        "mix.window_len=64",
    )
    return cfg, records, prep(cfg)


def test_every_format_arrives_intact(formats_run):
    cfg, records, prepared = formats_run
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    expected = Counter()
    for fmt_records in records.values():
        for fmt, record in fmt_records:
            enc = encode_chat(to_messages(record, fmt), tok)
            expected[tuple(enc["input_ids"])] += 1
    got = Counter()
    for split in (prepared.train_dir, prepared.val_dir):
        for row in _rows(split):
            for kind, ids, _labels in _segments(row):
                if kind == KIND_SFT:
                    got[tuple(ids)] += 1
    assert got == expected  # every conversation of every format, exactly once, nothing truncated
    report = prepared.report
    assert report["conversations"]["in"] == sum(len(v) for v in records.values())
    assert report["conversations"]["dropped"] == 0 and report["drops"] == {}
    by_path = {s["path"]: s for s in report["sources"]}
    for path, fmt_records in records.items():
        assert by_path[path]["records_in"] == len(fmt_records)
        assert by_path[path]["format"] == fmt_records[0][0]  # auto-detected
    assert by_path["hf:" + str(Path(next(iter(records))).parent / "hubdir")]["kind"] == "hub"


def test_rows_are_valid_training_rows(formats_run):
    cfg, _, prepared = formats_run
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = _rows(prepared.train_dir)
    assert rows
    for row in rows:
        assert len(row["input_ids"]) <= cfg.data.max_seq_len
        assert sum(row["seq_lens"]) == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]
        for kind, ids, labels in _segments(row):
            assert labels[0] == IGNORE_INDEX  # never a target across an example boundary
            assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids))
            if kind == KIND_SFT:
                trained = [i for lab, i in zip(labels, ids) if lab != IGNORE_INDEX]
                assert trained and trained[-1] == im_end  # the end-of-turn token is trained
            else:
                assert kind == KIND_PRETRAIN and labels[1:] == ids[1:]  # pretraining: every token trained


def test_mix_ratio_is_exact_and_heldout_is_disjoint(formats_run):
    cfg, _, prepared = formats_run
    rows = _rows(prepared.train_dir)
    pretrain = sum(n for r in rows for n, k in zip(r["seq_lens"], r["seq_kinds"]) if k == KIND_PRETRAIN)
    total = sum(len(r["input_ids"]) for r in rows)
    assert abs(pretrain / total - cfg.mix.ratio) < 0.01
    assert prepared.report["splits"]["train"]["mix_ratio_achieved"] == pytest.approx(pretrain / total)
    train_windows = {tuple(ids) for r in rows for k, ids, _ in _segments(r) if k == KIND_PRETRAIN}
    heldout = [tuple(ids) for r in _rows(prepared.heldout_dir) for k, ids, _ in _segments(r)]
    assert heldout and not (set(heldout) & train_windows)


def test_forgetting_is_measured_on_the_heldout_source_only(formats_run, cache_dir):
    # The default mix.heldout_sources is the pydoc prose the builtin base never trained on: every one of its windows
    # is held out, none of it is mixed into training, and no window of mix.sources is held out.
    cfg, _, prepared = formats_run
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    text = resolve_builtin("builtin:pydoc_topics_heldout", cache_dir).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
    expected = [tuple(w) for w in chunk_windows(ids, window_len=cfg.window_len)]
    heldout = [tuple(ids) for r in _rows(prepared.heldout_dir) for _, ids, _ in _segments(r)]
    assert sorted(heldout) == sorted(expected[: cfg.mix.max_heldout_windows])
    # Every mixed-in segment is (a cut of) a window of mix.sources, the topics the base trained on, and none of the
    # longer ones starts a held-out window (a cut of 2 tokens can match one by chance: it is not provenance).
    pool = resolve_builtin("builtin:pydoc_topics", cache_dir).read_text(encoding="utf-8")
    pool_ids = tok(pool, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
    starts = {tuple(w) for w in chunk_windows(pool_ids, window_len=cfg.window_len)}
    trained = [tuple(ids) for r in _rows(prepared.train_dir) for k, ids, _ in _segments(r) if k == KIND_PRETRAIN]
    assert trained and all(any(w[: len(seg)] == seg for w in starts) for seg in trained)
    assert not any(w[: len(seg)] == seg for seg in trained if len(seg) >= 16 for w in expected)
    assert prepared.report["pretraining_windows"]["heldout_from"] == ["builtin:pydoc_topics_heldout"]


def test_without_heldout_sources_a_hashed_share_of_the_mix_is_held_out(ray_local, cache_dir, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": _messages(i)}) + "\n" for i in range(200)))
    cfg = _cfg(tmp_path, cache_dir, [str(path)], "mix.ratio=0.2", "mix.window_len=64", "mix.heldout_sources=[]")
    prepared = prep(cfg)
    pool = resolve_builtin("builtin:pydoc_topics", cache_dir).read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    ids = tok(pool, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
    windows = {tuple(w) for w in chunk_windows(ids, window_len=64)}
    heldout = {tuple(ids) for r in _rows(prepared.heldout_dir) for _, ids, _ in _segments(r)}
    trained = {tuple(ids) for r in _rows(prepared.train_dir) for k, ids, _ in _segments(r) if k == KIND_PRETRAIN}
    assert heldout and heldout <= windows and not heldout & trained
    assert prepared.report["pretraining_windows"]["heldout_from"] == "mix.sources, 0.05 of their windows by hash"


def test_report_fields(formats_run):
    _, _, prepared = formats_run
    report = json.loads((prepared.out_dir / "report.json").read_text())
    assert len(report["fingerprint"]) == 64 and len(report["chat_template_hash"]) == 16
    for split in ("train", "val", "pretrain_heldout"):
        s = report["splits"][split]
        assert 0 < s["packing_efficiency"] <= 1 and 0 < s["trained_share"] <= 1
        assert s["rows"] == len(_rows(prepared.out_dir / split))
    assert report["conversations"]["val"] > 0


def test_rerun_is_cached_and_forced_rerun_is_identical(formats_run):
    cfg, _, prepared = formats_run
    assert prep(cfg).out_dir == prepared.out_dir  # same inputs: reused, not rebuilt
    before = {split: _rows(prepared.out_dir / split) for split in ("train", "val", "pretrain_heldout")}
    again = prep(cfg, force=True)
    assert again.report["fingerprint"] == prepared.report["fingerprint"]
    for split, rows in before.items():
        assert _rows(again.out_dir / split) == rows, f"{split} differs between two runs with the same seed"


REJECT_CONSECUTIVE_USERS = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == 'user' and messages[loop.index0 - 1]['role'] "
    "== 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_drop_counts_every_bad_row_by_reason(ray_local, cache_dir, tmp_path):
    good = [json.dumps({"messages": _messages(i)}) for i in range(6)]
    bad = {
        "invalid_json": '{"messages": [',
        "unknown_role": json.dumps(
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ),
        "bad_content": json.dumps(
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}
        ),
        "empty_assistant": json.dumps(
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}
        ),
        "no_assistant": json.dumps({"messages": [{"role": "user", "content": "x"}]}),
        "template_rejected": json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ),
        "too_long": json.dumps(
            {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
        ),
    }
    folder = tmp_path / "in"
    folder.mkdir()
    lines = good[:3] + list(bad.values()) + good[3:]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "b.jsonl").write_text("")
    template = tmp_path / "strict.jinja"
    template.write_text(REJECT_CONSECUTIVE_USERS)
    cfg = _cfg(
        tmp_path,
        cache_dir,
        [str(folder)],
        "data.on_error=drop",
        "data.max_seq_len=64",
        f"model.chat_template={template}",
        "mix.ratio=0.0",
    )
    prepared = prep(cfg)
    assert prepared.report["drops"] == {**{reason: 1 for reason in bad}, "empty_file": 1}
    assert prepared.report["conversations"]["train"] + prepared.report["conversations"]["val"] == len(good)
    drops = [json.loads(line) for line in (prepared.out_dir / "drops.jsonl").read_text().splitlines()]
    where = {d["reason"]: d["where"] for d in drops}
    for line_no, reason in enumerate(bad, start=4):  # bad rows start at line 4 of a.jsonl
        assert where[reason] == f"{folder / 'a.jsonl'}:{line_no}"
    assert "raise_exception" not in json.dumps(drops) and "must alternate" in json.dumps(drops)
    assert prepared.report["splits"]["train"]["pretrain_tokens"] == 0  # ratio 0 disables mixing


def test_raise_names_file_and_line(ray_local, cache_dir, tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps({"messages": _messages(i)}) for i in range(4)]
    lines[2] = '{"messages": [oops]}'
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, cache_dir, [str(path)])
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON.*data\.on_error=drop") as err:
        prep(cfg)
    assert err.value.reason == "invalid_json"
    assert not (tmp_path / "out" / "data").exists() or not any((tmp_path / "out" / "data").iterdir())


def test_cli_prep_with_defaults(ray_local, cache_dir, tmp_path, capsys, monkeypatch):
    """`make prep` with no overrides: the builtin demo data and pydoc corpus, through the CLI."""

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFTRAY_CACHE", str(cache_dir))
    assert main(["prep"]) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "outputs" / "data").iterdir()
    assert f"prepared data: {folder}" in out
    report = json.loads((folder / "report.json").read_text())
    assert abs(report["splits"]["train"]["mix_ratio_achieved"] - 0.1) < 0.01
    assert f"achieved {report['splits']['train']['mix_ratio_achieved']:.2%}" in out
    assert report["splits"]["train"]["packing_efficiency"] > 0.95  # demo rows pack almost full
    assert main(["prep", "--forse"]) == 1 and "--force" in capsys.readouterr().err


def test_demo_without_mix(ray_local, cache_dir, tmp_path):
    """mix=none on the builtin demo: no pretraining window is taken, so no empty window dataset joins the training
    split (Ray's hash shuffle then failed with "Schema at index 1 was different")."""
    cfg = prep_config(tmp_path, cache_dir, "mix=none")
    prepared = prep(cfg)
    train = prepared.report["splits"]["train"]
    assert train["pretrain_tokens"] == 0 and train["rows"] > 0
    assert train["examples"] + prepared.report["splits"]["val"]["examples"] == 2000
    assert all(k == 1 for row in _rows(prepared.out_dir / "train") for k in row["seq_kinds"])  # chat only


def test_a_small_corpus_is_reused_up_to_max_repeats(ray_local, cache_dir, tmp_path, capsys):
    """``sftray prep`` with a mix that needs more pretraining text than mix.sources hold fails naming
    mix.max_repeats and the passes it needs; with that many allowed, the corpus goes in as whole passes (every
    window of it at least passes-1 times), the ratio stays exact, held-out text stays out, and report.json and the
    summary count the repeats. Inputs span several files (blocks) on both sides."""
    chats, corpus = tmp_path / "chats", tmp_path / "corpus"
    chats.mkdir()
    corpus.mkdir()
    for f in range(2):
        rows = [{"messages": _messages(50 * f + i)} for i in range(40)]
        (chats / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    words = "river stone cloud light grass apple lamp door bird fish moon tree".split()
    for d in range(3):
        (corpus / f"doc{d}.txt").write_text(" ".join(words[(d + i) % len(words)] for i in range(60)) + ".\n")
    sources = [str(chats / "part0.jsonl"), str(chats / "part1.jsonl")]
    mix = [f"mix.sources=[{{path:'{corpus}',format:text}}]", "mix.ratio=0.5", "mix.window_len=32"]
    listed = ",".join("{path:'" + s + "'}" for s in sources)
    args = [f"paths.cache_dir={cache_dir}", f"paths.output_dir={tmp_path / 'out'}", f"data.sources=[{listed}]", *mix]
    assert main(["prep", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.fullmatch(
        r"error: the pretraining corpus has \d+ trainable tokens but the mix needs \d+ \((\d+) passes over it; "
        r"mix\.max_repeats=1 allows 1\): add pretraining text, lower mix\.ratio or set mix\.max_repeats=(\d+)",
        err,
    )
    assert found and found[1] == found[2], err
    passes = int(found[1])
    assert passes >= 3
    assert main(["prep", *args, f"mix.max_repeats={passes}"]) == 0
    out = capsys.readouterr().out
    prepared = load_prepared(Path(re.search(r"prepared data: (\S+)", out)[1]))

    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    windows = []
    for d in range(3):
        text = (corpus / f"doc{d}.txt").read_text(encoding="utf-8")
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
        windows += [tuple(w) for w in chunk_windows(ids, window_len=32)]
    rows = _rows(prepared.train_dir)
    trained = Counter(tuple(ids) for r in rows for k, ids, _ in _segments(r) if k == KIND_PRETRAIN)
    corpus = Counter(windows)  # a window two documents share counts twice
    cut = [w for w in trained if w not in corpus]
    assert set(trained) - set(cut) == set(corpus)
    assert all((passes - 1) * n <= trained[w] <= passes * n for w, n in corpus.items())
    assert len(cut) <= 1 and all(any(w[: len(c)] == c for w in windows) for c in cut)  # the cut that ends the mix
    train = prepared.report["splits"]["train"]
    assert train["pretrain_tokens"] == train["pretrain_tokens_target"]
    assert abs(train["mix_ratio_achieved"] - 0.5) < 0.01
    heldout = {tuple(ids) for r in _rows(prepared.heldout_dir) for _, ids, _ in _segments(r)}
    assert heldout and not heldout & set(trained)
    report = prepared.report["pretraining_windows"]
    assert report["passes"] == passes
    assert report["windows_used"] == sum(trained.values())
    assert report["windows_repeated"] == sum(trained.values()) - len(windows)
    assert (
        f"pretraining corpus reused: {passes} passes (mix.max_repeats={passes}), {report['windows_repeated']} of "
        f"{report['windows_used']} window uses are repeats"
    ) in out

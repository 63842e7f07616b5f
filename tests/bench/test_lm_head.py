"""The LM head part of the bench at the smoke size, without Ray: both heads timed on every step of every pass, and
the summary's speed-up is the ratio of their medians."""

from __future__ import annotations

import pytest

from sftray.bench import lm_head, report, workload
from sftray.bench.sizes import get_size
from sftray.bench.throughput import choose_examples


def test_lm_head_part_times_both_heads_on_the_same_steps(cache_dir, tmp_path):
    size = get_size("smoke")
    tokenizer = workload.tiny_tokenizer(cache_dir=cache_dir)
    demo = workload.encode_conversations(workload.demo_conversations(n=size.demo_conversations), tokenizer=tokenizer)
    model_dir = workload.build_model(out_dir=tmp_path, tokenizer=tokenizer, size=size.model)
    chosen = choose_examples(
        demo, max_seq_len=size.train_seq_len, rows_per_step=size.rows_per_step, steps=size.train_steps
    )
    rows, summary = lm_head.measure_lm_head(
        chosen, model_dir=model_dir, max_seq_len=size.train_seq_len, steps=size.train_steps, threads=1, repeats=2
    )
    assert [r["name"] for r in rows] == [lm_head.FULL_ROW, lm_head.TARGETS_ROW]
    for r in rows:
        assert len(r["values"]) == 2 * r["steps"] and all(v > 0 for v in r["values"])
        assert 0 < r["target_share"] < 1
    assert summary.keys() == set(lm_head.SUMMARY_KEYS)
    assert summary["lm_head_targets_speedup"] == pytest.approx(rows[0]["median"] / rows[1]["median"])
    assert lm_head.SECTION in report.SECTIONS

"""The prep summary (``sftray.data.report.summary``) says what the training split really holds."""

from __future__ import annotations

from typing import Any

from sftray.data.report import summary


def _report(*, sources: list[dict[str, Any]], train: int, mix_target: float, pretrain_tokens: int) -> dict[str, Any]:
    split = {"rows": 10, "examples": 20, "tokens": 1000, "trained_share": 0.5, "packing_efficiency": 0.9}
    return {
        "out_dir": "/o",
        "fingerprint": "f" * 16,
        "chat_template_hash": "abc",
        "conversations": {"in": 314, "train": train, "val": 60, "dropped": 4, "truncated": 0},
        "drops": {},
        "sources": sources,
        "pretraining_windows": {"passes": 1},
        "splits": {
            "train": {
                **split,
                "mix_ratio_target": mix_target,
                "mix_ratio_achieved": mix_target,
                "pretrain_tokens": pretrain_tokens,
                "pretrain_share_of_trained": mix_target,
            },
            "val": split,
        },
    }


def _source(path: str, *, weight: float, max_rows: int | None, copies: int, unused: int) -> dict[str, Any]:
    return {
        "path": path,
        "weight": weight,
        "max_rows": max_rows,
        "token_share": 0.5,
        "token_share_target": 0.5,
        "train_copies": copies,
        "train_rows_unused": unused,
    }


def test_weighted_sources_say_how_many_examples_train_and_how_many_rows_are_unused() -> None:
    sources = [
        _source("a.jsonl", weight=2.0, max_rows=None, copies=200, unused=0),
        _source("b.jsonl", weight=0.5, max_rows=None, copies=76, unused=74),
    ]
    text = summary(_report(sources=sources, train=250, mix_target=0.1, pretrain_tokens=100))
    assert "314 in -> 250 train + 60 val" in text
    assert "training takes 276 SFT examples from the 250 train conversations: 74 unused, 100 extra copies" in text
    assert "max_rows None" not in text
    assert "source a.jsonl: 50.0% of SFT training tokens (target 50.0%; weight 2)" in text


def test_max_rows_is_shown_only_when_set() -> None:
    sources = [_source("a.jsonl", weight=1.0, max_rows=100, copies=100, unused=150)]
    text = summary(_report(sources=sources, train=250, mix_target=0.1, pretrain_tokens=100))
    assert "(target 50.0%; weight 1, max_rows 100)" in text
    assert "training takes 100 SFT examples from the 250 train conversations: 150 unused" in text


def test_unweighted_sources_add_no_line() -> None:
    sources = [_source("a.jsonl", weight=1.0, max_rows=None, copies=250, unused=0)]
    text = summary(_report(sources=sources, train=250, mix_target=0.1, pretrain_tokens=100))
    assert "training takes" not in text


def test_no_mix_says_off() -> None:
    sources = [_source("a.jsonl", weight=1.0, max_rows=None, copies=250, unused=0)]
    text = summary(_report(sources=sources, train=250, mix_target=0.0, pretrain_tokens=0))
    assert "pretraining mix: off (mix.ratio=0)" in text
    assert "0.00%" not in text

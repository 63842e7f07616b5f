"""The pipeline's read plan and encoder run in process (no Ray): a big file is cut into pieces for every CPU, and
neither the cut nor the encoder's Arrow chunks change a single encoded row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from sftray.config import DataConfig, SourceConfig
from sftray.data import encoder as encoder_mod
from sftray.data import read_plan
from sftray.data.encoder import Encoder, EncoderArgs
from sftray.data.sources import resolve_source
from sftray.data.tokenizer_view import spec_of
from sftray.models.tiny import ensure_tiny_tokenizer


@pytest.fixture(scope="module")
def encoder_and_source(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("sftray-cache")
    tok = AutoTokenizer.from_pretrained(ensure_tiny_tokenizer(cache))
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    lines = []
    for i in range(3000):
        user = {"role": "user", "content": f"What is {i} plus {i + 1}? " + "Please explain. " * (i % 7)}
        lines.append(json.dumps({"messages": [user, {"role": "assistant", "content": str(2 * i + 1)}]}))
    lines[17] = "{not json"  # a bad row keeps its place and its reason whatever the cut
    path.write_text("\n".join(lines) + "\n")
    src = resolve_source(SourceConfig(path=str(path)), cache_dir=cache, what="data.sources[0]")
    encoder = Encoder(
        EncoderArgs(
            spec=spec_of(tok),
            sources=[src],
            data=DataConfig(max_seq_len=64),
            window_len=64,
            heldout_fraction=0.05,
            heldout_sources=(),
            seed=0,
            hash_split=True,
        )
    )
    return encoder, src


def _encode(encoder: Encoder, pieces: list[dict]) -> pa.Table:
    return pa.concat_tables([encoder(pa.Table.from_pylist([p])) for p in pieces]).combine_chunks()


def test_a_big_file_is_cut_into_pieces_for_every_cpu(encoder_and_source, monkeypatch):
    _, src = encoder_and_source
    monkeypatch.setattr(read_plan, "PIECE_BYTES", (1 << 10, 1 << 24))  # the test file is ~250 KB
    for cpus in (1, 2, 8):
        pieces = read_plan.pieces([src], ["train"], cpus=cpus)
        assert len(pieces) == pytest.approx(cpus * read_plan.PIECES_PER_CPU, abs=1)
        assert sum(p["length"] for p in pieces) == Path(src.paths[0]).stat().st_size  # every byte, once


def test_the_cut_and_the_arrow_chunks_do_not_change_a_row(encoder_and_source, monkeypatch):
    encoder, src = encoder_and_source
    whole = _encode(encoder, read_plan.pieces([src], ["train"], cpus=1))
    assert whole.num_rows == 3000 and whole.column("reason").to_pylist()[17] != ""
    monkeypatch.setattr(read_plan, "PIECE_BYTES", (1 << 10, 1 << 24))
    monkeypatch.setattr(encoder_mod, "ROWS_PER_CHUNK", 7)  # chunks that end mid-piece, and a short last one
    cut = read_plan.pieces([src], ["train"], cpus=8)
    assert len(cut) > 8
    chunked = encoder(pa.Table.from_pylist([cut[0]]))
    assert chunked.column("key").num_chunks > 1  # the chunking really happened
    assert _encode(encoder, cut).equals(whole)

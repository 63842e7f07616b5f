"""Tests for sftray.models.pretrain: the pretrained tiny base model and its cache helper (no Ray)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftray.config import ModelConfig
from sftray.models import pretrain
from sftray.models.cache import is_complete
from sftray.models.loading import BUILTIN_TINY, resolve_base_model_path
from sftray.models.tiny import EOS_TOKEN, IM_END, ensure_tiny_tokenizer

# Smallest budget that beats the unigram baseline with a margin on the held-out topics (seed 0: 6.24 vs 6.33 nats at
# 200 steps; 6.30 at 150, 6.32 at 100); ~102k tokens, ~10 s on an idle 2-core CPU.
SMALL = dict(steps=200, seq_len=32, batch_size=16, lr=6e-3, warmup_steps=10, log_every=25)
REPORT_KEYS = {"steps", "train_loss", "heldout_loss", "unigram_loss", "seconds", "tokens_seen"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    cache = tmp_path_factory.mktemp("pretrain-cache")
    out = cache / "model"
    report = pretrain.pretrain_tiny(out, tokenizer_dir=ensure_tiny_tokenizer(cache), **SMALL)
    return out, report


def test_output_is_an_ordinary_hf_folder(built):
    out, _ = built
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    eos, im_end = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(IM_END)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == eos and model.config.pad_token_id == eos and model.config.bos_token_id is None
    assert model.generation_config.eos_token_id == [im_end, eos]
    assert model.generation_config.pad_token_id == eos
    ids = tok("The for statement", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_report_is_returned_and_saved(built):
    out, report = built
    assert set(report) == REPORT_KEYS
    assert json.loads((out / pretrain.REPORT_NAME).read_text()) == report
    assert report["steps"] == SMALL["steps"]
    assert report["tokens_seen"] == SMALL["steps"] * SMALL["batch_size"] * SMALL["seq_len"]


def test_learns_more_than_token_frequencies(built):
    _, report = built
    initial = math.log(4096)  # a freshly initialised model predicts ~uniformly over the vocab
    assert report["train_loss"] < initial - 1.5
    assert report["heldout_loss"] < report["unigram_loss"] - 0.05, report


def test_windows_are_consecutive_and_drop_the_partial_tail():
    got = pretrain.windows(list(range(1005)), seq_len=10)
    assert got.shape == (100, 10) and got.flatten().tolist() == list(range(1000))
    with pytest.raises(ValueError, match="too few for one window"):
        pretrain.windows(list(range(9)), seq_len=10)


def test_unigram_loss_uses_add_one_smoothing():
    train = torch.tensor([[0, 0, 0, 1]])  # counts 3, 1, 0 over a vocab of 3 -> probs 4/7, 2/7, 1/7
    heldout = torch.tensor([[2, 0, 2]])  # the first position is never a target
    got = pretrain.unigram_loss(train, heldout, vocab_size=3)
    assert got == pytest.approx(-(math.log(4 / 7) + math.log(1 / 7)) / 2)


@pytest.fixture
def no_tokenizer_build(monkeypatch):
    """The cache tests exercise ensure_tiny_model's bookkeeping, not the BPE: skip training it."""
    monkeypatch.setattr(pretrain, "ensure_tiny_tokenizer", lambda cache_dir: Path(cache_dir) / "tiny-llama")


def _fake_pretrain(calls: list[Path], *, gate: threading.Event | None = None):
    """Stands in for pretrain_tiny: writes the marker files (slowly when gated) and counts calls."""

    def fake(out_dir: Path, *, tokenizer_dir: Path, **kwargs) -> dict:
        calls.append(Path(out_dir))
        if len(calls) > 1:
            raise AssertionError("ensure_tiny_model rebuilt a complete model")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            (out_dir / name).write_text("{}")
        if gate is not None:
            assert gate.wait(timeout=30)
        (out_dir / pretrain.REPORT_NAME).write_text(json.dumps(kwargs))
        return kwargs

    return fake


def test_ensure_builds_once_then_reuses(tmp_path, monkeypatch, no_tokenizer_build):
    calls: list[Path] = []
    monkeypatch.setattr(pretrain, "pretrain_tiny", _fake_pretrain(calls))
    first = pretrain.ensure_tiny_model(tmp_path, steps=3)
    assert first == tmp_path / pretrain.TINY_MODEL_DIRNAME
    assert json.loads((first / pretrain.REPORT_NAME).read_text()) == {"steps": 3}
    assert pretrain.ensure_tiny_model(tmp_path, steps=3) == first  # the fake raises if called again
    assert len(calls) == 1 and calls[0] != first  # built elsewhere, renamed into place
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{pretrain.TINY_MODEL_DIRNAME}.")]
    assert leftovers == [f".{pretrain.TINY_MODEL_DIRNAME}.lock"]


def test_ensure_never_shows_a_half_built_folder(tmp_path, monkeypatch, no_tokenizer_build):
    calls: list[Path] = []
    gate = threading.Event()
    monkeypatch.setattr(pretrain, "pretrain_tiny", _fake_pretrain(calls, gate=gate))
    target = tmp_path / pretrain.TINY_MODEL_DIRNAME
    results: list[Path] = []
    builder = threading.Thread(target=lambda: results.append(pretrain.ensure_tiny_model(tmp_path)))
    builder.start()
    try:
        for _ in range(300):  # wait (<= 30 s) until the build is under way
            if calls:
                break
            threading.Event().wait(0.1)
        assert calls, "the build never started"
        assert not target.exists() and not is_complete(target, pretrain.COMPLETE_MARKERS)
    finally:
        gate.set()
        builder.join(timeout=30)
    assert results == [target] and is_complete(target, pretrain.COMPLETE_MARKERS)
    # A second caller that waited on the lock reuses the finished folder.
    assert pretrain.ensure_tiny_model(tmp_path) == target and len(calls) == 1


def test_resolve_base_model_path(tmp_path, monkeypatch, no_tokenizer_build):
    monkeypatch.setattr(pretrain, "pretrain_tiny", _fake_pretrain([]))
    got = resolve_base_model_path(ModelConfig(name_or_path=BUILTIN_TINY), cache_dir=tmp_path)
    assert got == str(tmp_path / pretrain.TINY_MODEL_DIRNAME)
    assert resolve_base_model_path(ModelConfig(name_or_path="org/model"), cache_dir=tmp_path) == "org/model"
    with pytest.raises(ValueError, match="builtin"):
        resolve_base_model_path(ModelConfig(name_or_path="builtin:other"), cache_dir=tmp_path)

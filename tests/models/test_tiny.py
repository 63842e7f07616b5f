"""Tests for sftray.models.tiny: offline ChatML tokenizer, its cache helper and the tiny Llama config."""

from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

from sftray.data.builtin import generate_demo_conversations, pydoc_topics_text
from sftray.models import tiny

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "7"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tiny.build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_build_returns_and_saves_fast_tokenizer(tmp_path):
    built = tiny.build_tiny_tokenizer(tmp_path / "t")
    assert built.is_fast
    assert len(built) == 4096
    assert (tmp_path / "t" / "tokenizer.json").is_file()


def test_reload_with_autotokenizer(tok):
    assert tok.is_fast
    assert len(tok) == 4096
    assert tok.chat_template == tiny.CHATML_TEMPLATE
    assert tok.model_max_length == 1024
    assert tok.bos_token is None


def test_special_tokens_are_single_atomic_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    assert ids == [0, 1, 2]
    assert set(ids) <= set(tok.all_special_ids)
    for token, token_id in zip(SPECIALS, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        # Atomic even when glued to ordinary text.
        assert tok.encode(f"ab{token}cd", add_special_tokens=False).count(token_id) == 1


def test_pad_equals_eos(tok):
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 0


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CONV[1:2], tokenize=False, add_generation_prompt=True)
    # No default system prompt is injected.
    assert prompt == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="Unsupported chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_deterministic_vocab(tmp_path, tok_dir):
    again = tiny.build_tiny_tokenizer(tmp_path / "again")
    first = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    second = json.loads((tmp_path / "again" / "tokenizer.json").read_text(encoding="utf-8"))
    assert first["model"]["vocab"] == second["model"]["vocab"]
    assert first["model"]["merges"] == second["model"]["merges"]
    assert again.get_vocab() == AutoTokenizer.from_pretrained(tok_dir).get_vocab()


def test_offsets_mapping_tiles_text(tok):
    text = tok.apply_chat_template(CONV, tokenize=False)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    # Untrimmed offsets: consecutive, gap-free, covering the whole string.
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))
    # The assistant answer "7" maps back to its own token.
    answer_start = text.rindex("7<|im_end|>")
    (idx,) = [i for i, (s, e) in enumerate(offsets) if s == answer_start]
    assert tok.decode([enc["input_ids"][idx]]) == "7"


def test_roundtrip_and_compression(tok):
    convs = generate_demo_conversations(50, seed=99)
    for conv in convs:
        text = tok.apply_chat_template(conv["messages"], tokenize=False)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # A trained BPE compresses English prose well beyond 1 byte/token.
    sample = pydoc_topics_text()[:20_000]
    assert len(sample) / len(tok.encode(sample, add_special_tokens=False)) > 3.0
    # Numbers split into single digits (as Qwen2/Llama-3 do), so arithmetic is learnt digit by digit.
    assert tok.tokenize(" 420") == ["Ġ", "4", "2", "0"]


def test_ensure_tiny_tokenizer_idempotent(tmp_path, monkeypatch):
    path = tiny.ensure_tiny_tokenizer(tmp_path)
    assert path == tmp_path / "tiny-llama"
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.is_fast and loaded.chat_template == tiny.CHATML_TEMPLATE
    mtime = (path / "tokenizer.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(tiny, "build_tiny_tokenizer", fail)
    assert tiny.ensure_tiny_tokenizer(tmp_path) == path
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
    # No temp build dirs left next to the result.
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["tiny-llama"]


def test_ensure_tiny_tokenizer_concurrent_builds_once(tmp_path, monkeypatch):
    calls = []
    real_build = tiny.build_tiny_tokenizer

    def counting_build(out_dir, **kwargs):
        calls.append(out_dir)
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(tiny, "build_tiny_tokenizer", counting_build)
    # Futures re-raise worker exceptions in .result(), so failures surface here.
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(tiny.ensure_tiny_tokenizer, tmp_path) for _ in range(3)]
        results = [f.result() for f in futures]
    assert len(calls) == 1
    assert set(results) == {tmp_path / "tiny-llama"}


def test_ensure_fills_existing_folder_without_clobbering(tmp_path):
    target = tmp_path / "tiny-llama"
    target.mkdir()
    (target / "keep.txt").write_text("other asset", encoding="utf-8")
    assert tiny.ensure_tiny_tokenizer(tmp_path) == target
    assert (target / "keep.txt").read_text(encoding="utf-8") == "other asset"
    assert AutoTokenizer.from_pretrained(target).is_fast


def test_tiny_llama_config_values_and_overrides():
    cfg = tiny.tiny_llama_config(vocab_size=4096)
    assert isinstance(cfg, transformers.LlamaConfig)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        128,
        352,
        4,
    )
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.max_position_embeddings == 1024 and cfg.tie_word_embeddings
    # Token ids are the caller's: no Llama defaults (1/2) leak in.
    assert cfg.bos_token_id is None and cfg.eos_token_id is None and cfg.pad_token_id is None
    over = tiny.tiny_llama_config(vocab_size=100, eos_token_id=0, pad_token_id=0, num_hidden_layers=2)
    assert (
        over.vocab_size,
        over.eos_token_id,
        over.pad_token_id,
        over.num_hidden_layers,
    ) == (100, 0, 0, 2)


def test_llama_forward_pass(tok):
    torch.manual_seed(0)
    cfg = tiny.tiny_llama_config(
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 3_000_000
    texts = [
        tok.apply_chat_template(CONV, tokenize=False),
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    batch = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)
    # Untrained model: loss near ln(vocab), i.e. roughly uniform predictions.
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(tok)))).item()) < 1.0

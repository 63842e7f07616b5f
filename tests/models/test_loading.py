"""sftray.models.loading: the vocabulary stays the base's unless the chat template needs tokens it lacks, and an
adapter trained with added tokens says so and loads with the two documented lines (or ``load_trained``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftray.config import LoraConfig, ModelConfig
from sftray.models.loading import load_model, load_tokenizer
from sftray.models.lora import ADAPTER_NOTE, apply_lora
from sftray.train import checkpoint

LLAMA3_TEMPLATE = (  # Llama-3's control tokens, none of which the no-pad base has
    "{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + "
    "'<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _vocab_size(base: Path) -> int:
    return json.loads((base / "config.json").read_text())["vocab_size"]


def test_a_tokenizer_class_default_pad_adds_no_token_and_pad_reuses_eos(nopad_base, tmp_path):
    assert len(AutoTokenizer.from_pretrained(nopad_base)) == _vocab_size(nopad_base) + 1  # what transformers does
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(nopad_base)), cache_dir=tmp_path)
    assert len(tokenizer) == _vocab_size(nopad_base) and "<|endoftext|>" not in tokenizer.get_vocab()
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    tokenizer.save_pretrained(tmp_path / "saved")  # what prep hands the workers, reloaded as they do
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert len(again) == len(tokenizer) and again.pad_token_id == tokenizer.pad_token_id


def test_template_tokens_the_base_lacks_are_added_recorded_and_load_with_the_documented_lines(nopad_base, tmp_path):
    from peft import PeftModel

    from sftray.models.loading import load_trained

    cfg = ModelConfig(name_or_path=str(nopad_base), chat_template=LLAMA3_TEMPLATE)
    tokenizer = load_tokenizer(cfg, cache_dir=tmp_path)
    added = ["<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>"]
    assert len(tokenizer) == _vocab_size(nopad_base) + 3
    model, new_ids = load_model(str(nopad_base), tokenizer=tokenizer)
    model = apply_lora(model, cfg=LoraConfig(target_modules=["q_proj", "v_proj"]), new_token_ids=new_ids)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: the adapter and the new rows differ from their start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    checkpoint.save(model, optimizer, directory=tmp_path / "ckpt", tokenizer=tokenizer, state={}, rank=0, tables={})
    adapter = tmp_path / "ckpt" / "model"

    note = json.loads((adapter / ADAPTER_NOTE).read_text())
    assert sorted(note["added_tokens"].values()) == added and note["vocab_size"] == len(tokenizer)
    assert note["base_model"] == str(nopad_base) and len(note["load"]) == 3
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Add 1 and 4."}], tokenize=False)
    ids = tokenizer(chat, return_tensors="pt").input_ids
    assert (ids >= _vocab_size(nopad_base)).any()  # the added tokens' trained rows are used
    expected = model.eval()(ids).logits
    # The two lines the docs and the note show, in plain transformers + peft:
    plain = AutoModelForCausalLM.from_pretrained(nopad_base)
    plain.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)))
    plain = PeftModel.from_pretrained(plain, adapter)
    torch.testing.assert_close(plain(ids).logits, expected)
    for path in (tmp_path / "ckpt", adapter):  # a checkpoint folder or its model/ folder
        loaded, loaded_tokenizer = load_trained(path)
        assert len(loaded_tokenizer) == len(tokenizer)
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_the_builtin_tokenizer_keeps_its_vocabulary_and_pad(cache_dir):
    tokenizer = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"), cache_dir=cache_dir)
    assert len(tokenizer) == 4096 and tokenizer.pad_token == "<|endoftext|>"


def test_template_tokens_on_a_padded_embedding_take_its_spare_rows_and_train(padded_base, tmp_path):
    from peft import PeftModel

    rows = _vocab_size(padded_base)
    cfg = ModelConfig(name_or_path=str(padded_base), chat_template=LLAMA3_TEMPLATE)
    tokenizer = load_tokenizer(cfg, cache_dir=tmp_path)
    assert len(tokenizer) == rows - 8 + 3
    base = AutoModelForCausalLM.from_pretrained(padded_base)
    model, new_ids = load_model(str(padded_base), tokenizer=tokenizer)
    assert new_ids == [rows - 8, rows - 7, rows - 6]  # the added tokens' ids: spare rows, no resize
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == rows
    torch.testing.assert_close(weight[new_ids], base.get_input_embeddings().weight[: rows - 8].mean(0).expand(3, -1))
    model = apply_lora(model, cfg=LoraConfig(target_modules=["q_proj"]), new_token_ids=new_ids)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    checkpoint.save(model, optimizer, directory=tmp_path / "ckpt", tokenizer=tokenizer, state={}, rank=0, tables={})
    note = json.loads((tmp_path / "ckpt" / "model" / ADAPTER_NOTE).read_text())
    assert sorted(note["added_tokens"]) == [str(i) for i in new_ids] and len(note["load"]) == 2  # no resize line
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Add 1 and 4."}], tokenize=False)
    ids = tokenizer(chat, return_tensors="pt").input_ids
    plain = PeftModel.from_pretrained(base, tmp_path / "ckpt" / "model")  # the unmodified base, as it is
    torch.testing.assert_close(plain(ids).logits, model.eval()(ids).logits)

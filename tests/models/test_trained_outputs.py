"""Every kind of output ``sftray train`` writes loads with plain transformers/peft on the unmodified base.

The base (tests/models/conftest.py) has no pad token and a tokenizer class that would invent one: the run must keep
the base's vocabulary, so the adapter loads with ``PeftModel.from_pretrained`` on the base as it is, and the full and
merged models with ``AutoModelForCausalLM.from_pretrained`` beside the base's own tokenizer.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftray.models.loading import load_trained
from sftray.models.lora import ADAPTER_NOTE

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _train(nopad_base: Path, training_run, tmp_path: Path, capsys, *overrides: str) -> Path:
    """One ``sftray train`` epoch on the no-pad base; returns its best checkpoint folder."""
    argv = [*training_run(tmp_path, tmp_path / "out"), "model=hf", f"model.name_or_path={nopad_base}"]
    assert main(["train", *argv, "train.epochs=1", "train.cpus_per_worker=0.5", *overrides]) == 0
    return Path(capsys.readouterr().out.split("best checkpoint: ")[1].split()[0])


def _logits(model, tokenizer) -> torch.Tensor:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 5."}], tokenize=False)
    with torch.no_grad():
        return model.eval()(tokenizer(chat, return_tensors="pt").input_ids).logits


def _vocab_size(base: Path) -> int:
    return json.loads((base / "config.json").read_text())["vocab_size"]


def test_a_lora_adapter_and_its_merged_model_load_on_the_unmodified_base(
    ray_local, nopad_base, training_run, tmp_path, capsys
):
    from peft import PeftModel

    best = _train(
        nopad_base, training_run, tmp_path, capsys, "train.method=lora", "train.lr=5e-3", "train.export_merged=true"
    )
    tokenizer = AutoTokenizer.from_pretrained(best / "model")
    assert len(tokenizer) == _vocab_size(nopad_base) and tokenizer.pad_token == tokenizer.eos_token
    assert json.loads((best / "model" / ADAPTER_NOTE).read_text())["added_tokens"] == {}
    base = AutoModelForCausalLM.from_pretrained(nopad_base)
    base_logits = _logits(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, best / "model")  # plain peft on the base as it is
    logits = _logits(adapted, tokenizer)
    assert not torch.allclose(logits, base_logits)  # the adapter trained
    torch.testing.assert_close(logits, _logits(load_trained(best)[0], tokenizer))
    merged = AutoModelForCausalLM.from_pretrained(best / "merged")  # plain transformers, no peft
    assert merged.config.vocab_size == _vocab_size(nopad_base)
    torch.testing.assert_close(_logits(merged, tokenizer), logits, rtol=1e-5, atol=1e-5)


def test_a_full_model_loads_beside_the_base_tokenizer(ray_local, nopad_base, training_run, tmp_path, capsys):
    best = _train(nopad_base, training_run, tmp_path, capsys, "train.method=full")
    model = AutoModelForCausalLM.from_pretrained(best / "model")  # plain transformers
    assert model.config.vocab_size == _vocab_size(nopad_base)
    tokenizer = AutoTokenizer.from_pretrained(best / "model")
    assert len(tokenizer) == _vocab_size(nopad_base)
    logits = _logits(model, tokenizer)
    assert not torch.allclose(logits, _logits(AutoModelForCausalLM.from_pretrained(nopad_base), tokenizer))
    torch.testing.assert_close(logits, _logits(load_trained(best)[0], tokenizer))

"""``train.parallelism=auto`` on the driver: the model sized from its safetensors headers, the choice logged."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaForCausalLM

from sftray.config import Config, LoraConfig, TrainConfig
from sftray.models.lora import apply_lora
from sftray.models.tiny import tiny_llama_config
from sftray.train import parallelism
from sftray.train.parallelism import count_parameters, resolve_parallelism, weight_shapes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=300, num_hidden_layers=2, tie_word_embeddings=False)).save_pretrained(
        folder
    )
    return folder


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_headers_count_what_full_fine_tuning_and_lora_train(base):
    shapes, vocab_size = weight_shapes(str(base))
    model = LlamaForCausalLM.from_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    assert count_parameters(shapes, vocab_size=vocab_size, method="full", lora=LoraConfig()) == (params, params)
    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        lora = LoraConfig(target_modules=targets)
        peft_model = apply_lora(LlamaForCausalLM.from_pretrained(base), cfg=lora, new_token_ids=[])
        total, trainable = count_parameters(shapes, vocab_size=vocab_size, method="lora", lora=lora)
        assert trainable == _trainable(peft_model), targets  # the same adapters as peft makes
        assert total == sum(p.numel() for p in peft_model.parameters())
        assert trainable < params / 5  # the adapters are a small share: their AdamW state is too


def _cfg(**train) -> Config:
    return Config(train=TrainConfig(**train))


def test_auto_picks_ddp_when_a_replica_fits_and_fsdp_when_not_and_logs_why(base, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sftray.train")
    monkeypatch.setattr(parallelism, "worker_memory", lambda t: (1024**3, "test"))
    assert resolve_parallelism(_cfg(method="full"), base_model=str(base)).train.parallelism == "ddp"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("train.parallelism=auto: ddp (a replica with gradients and AdamW state: ")
    assert "a worker's memory: 1.00 GiB, test" in line
    monkeypatch.setattr(parallelism, "worker_memory", lambda t: (64 * 1024, "test"))
    assert resolve_parallelism(_cfg(method="full"), base_model=str(base)).train.parallelism == "fsdp"


def test_one_worker_trains_with_ddp_and_a_chosen_parallelism_stays(base, monkeypatch):
    monkeypatch.setattr(parallelism, "worker_memory", lambda t: pytest.fail("one worker needs no estimate"))
    assert resolve_parallelism(_cfg(num_workers=1), base_model=str(base)).train.parallelism == "ddp"
    for chosen in ("ddp", "fsdp"):
        cfg = _cfg(parallelism=chosen)
        assert resolve_parallelism(cfg, base_model=str(base)) is cfg


def test_auto_falls_back_to_fsdp_without_local_weights(tmp_path):
    assert resolve_parallelism(_cfg(), base_model=str(tmp_path)).train.parallelism == "fsdp"


def test_a_mistyped_parallelism_lists_the_valid_values():
    with pytest.raises(ValueError, match="train.parallelism='fdsp' is not valid; choose one of: auto, ddp, fsdp"):
        TrainConfig(parallelism="fdsp")

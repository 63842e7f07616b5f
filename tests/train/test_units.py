"""Unit tests of training-side pieces that need no Ray: model loading with added tokens, LoRA, and the driver's
resource and validation checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from sftray.config import LoraConfig, ModelConfig, TrainConfig
from sftray.eval.metrics import select_best
from sftray.models.loading import add_template_tokens, load_model, load_tokenizer
from sftray.models.lora import apply_lora
from sftray.models.tiny import CHATML_TEMPLATE, tiny_llama_config
from sftray.train.run import TrainOutcome, check_resources, check_validation, summary


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory):
    """A base model whose tokenizer has NO chat tokens (like a raw pretrained LM)."""
    root = tmp_path_factory.mktemp("plain")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["hello world, the plain text of a base model"] * 50,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    hf.save_pretrained(root)
    torch.manual_seed(0)
    LlamaForCausalLM(
        tiny_llama_config(vocab_size=len(hf), num_hidden_layers=1, tie_word_embeddings=False)
    ).save_pretrained(root)
    return root


def test_missing_template_tokens_are_added_with_mean_initialised_rows(plain_base, tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    tok = load_tokenizer(ModelConfig(name_or_path=str(plain_base), chat_template=str(template)), cache_dir=tmp_path)
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    base_size = len(AutoTokenizer.from_pretrained(plain_base))
    assert all(i >= base_size for i in ids) and tok.tokenize("a<|im_end|>b")[1] == "<|im_end|>"  # new, atomic
    assert add_template_tokens(tok) == []  # idempotent
    base = LlamaForCausalLM.from_pretrained(plain_base)
    model, new_ids = load_model(str(plain_base), tokenizer=tok)
    assert new_ids == sorted(ids)
    for emb, old in (
        (model.get_input_embeddings(), base.get_input_embeddings()),
        (model.get_output_embeddings(), base.get_output_embeddings()),
    ):
        mean = old.weight.mean(dim=0)
        for i in new_ids:
            assert torch.allclose(emb.weight[i], mean)  # not random
        assert torch.equal(emb.weight[: old.weight.shape[0]], old.weight)


def test_lora_trains_new_token_rows_and_adapters_only(plain_base, tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    tok = load_tokenizer(ModelConfig(name_or_path=str(plain_base), chat_template=str(template)), cache_dir=tmp_path)
    model, new_ids = load_model(str(plain_base), tokenizer=tok)
    peft_model = apply_lora(model, cfg=LoraConfig(r=4, alpha=8, dropout=0.0), new_token_ids=new_ids)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable), trainable
    assert any("trainable_tokens" in n for n in trainable)  # the new rows learn under LoRA too


def test_check_resources_fails_fast_naming_the_knobs():
    check_resources(TrainConfig(num_workers=2, cpus_per_worker=1.0), available={"CPU": 2.0})
    with pytest.raises(ValueError, match=r"needs 3 CPUs .* has 2: lower train.num_workers or train.cpus_per_worker"):
        check_resources(TrainConfig(num_workers=3, cpus_per_worker=1.0), available={"CPU": 2.0})
    with pytest.raises(ValueError, match="needs 2 GPUs but Ray has 0"):
        check_resources(TrainConfig(num_workers=2, cpus_per_worker=0.5, use_gpu=True), available={"CPU": 8.0})


def test_a_run_without_validation_conversations_fails_before_any_worker_starts():
    report = {"out_dir": "/x/data/files-abc", "conversations": {"train": 24, "val": 0}}
    report["config"] = {"data": {"val_fraction": 0.05}}
    with pytest.raises(
        ValueError,
        match=r"no validation conversations in /x/data/files-abc \(24 train, "
        r"data.val_fraction=0.05\): raise data.val_fraction or give data.val_sources",
    ):
        check_validation(report)
    check_validation({**report, "conversations": {"train": 24, "val": 1}})


def test_epoch_rows_deal_a_fresh_permutation_to_every_rank():
    """Ranks share no row and cover every row once per epoch; a new seed (epoch) reshuffles the whole set, so a
    rank's rows change between epochs (a shard with a local shuffle buffer would keep them)."""
    from sftray.data.collate import epoch_rows

    world, n = 3, 30
    one = [epoch_rows(n, rank=r, world=world, seed=1) for r in range(world)]
    two = [epoch_rows(n, rank=r, world=world, seed=2) for r in range(world)]
    for epoch in (one, two):
        assert sorted(i for rank in epoch for i in rank) == list(range(n))
        assert {len(rank) for rank in epoch} == {n // world}
    assert one == [epoch_rows(n, rank=r, world=world, seed=1) for r in range(world)]  # same seed, same deal
    assert all(set(a) != set(b) for a, b in zip(one, two))
    with pytest.raises(ValueError, match="31 rows do not split evenly over 3 ranks"):
        epoch_rows(31, rank=0, world=3, seed=1)


def test_the_summary_warns_when_the_chosen_checkpoint_is_worse_than_the_base():
    base = {"epoch": 0, "step": 0, "val/loss": 2.0, "eval/format_compliance": 0.141, "eval/forgetting": 0.0}
    epoch = {"epoch": 1, "step": 4, "val/loss": 1.5, "eval/format_compliance": 0.0, "eval/forgetting": 0.01}
    choice = select_best([epoch], metric="eval/format_compliance", forgetting_budget=0.05, base=base)
    outcome = TrainOutcome(
        path="/runs/r",
        history=[base, epoch],
        checkpoints=[("/runs/r/epoch_01", epoch)],
        best_checkpoint="/runs/r/epoch_01",
        best_metrics=epoch,
        best_reason=choice.reason,
        worse_than_base=choice.worse_than_base,
    )
    text = summary(outcome)
    assert "chosen for: highest eval/format_compliance (0.000)" in text
    assert "worse than the base model on eval/format_compliance (0.000 vs 0.141 before training)" in text
    assert "warning: training made the model worse than the base model (epoch 0)" in text
    better = dataclasses.replace(outcome, best_reason="highest eval/format_compliance (0.500)", worse_than_base=False)
    assert "warning" not in summary(better)

"""The forward pass with the LM head at kept positions only: the full head's logits at those positions, for a
model that soft-caps its logits after the head and for one whose head is no module."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sftray.core.forward import forward_kept_logits, forward_logits
from sftray.core.loss import target_positions, target_token_losses, token_losses
from sftray.data.chat import IGNORE_INDEX

VOCAB = 40


def _batch() -> dict[str, torch.Tensor]:
    """Two packed rows of 10 (position_ids restart, no attention_mask); a random half of the labels are targets."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    return {
        "input_ids": ids,
        "labels": torch.where(torch.rand(2, 10, generator=g) < 0.5, ids, IGNORE_INDEX),
        "position_ids": torch.tensor([list(range(4)) + list(range(6)), list(range(10))]),
    }


def test_soft_capped_logits_are_the_full_heads_at_the_kept_positions():
    """Gemma 2 soft-caps its logits after the head (final_logit_softcapping): that cap still applies."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=0.5,  # small: every logit is visibly capped
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()
    batch = _batch()
    keep = target_positions(batch["labels"])
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        full = forward_logits(model, batch)
        kept = forward_kept_logits(model, batch, keep)
    assert seen == [(2, 10, VOCAB), (1, int(keep.sum()), VOCAB)]
    assert full.abs().max() <= 0.5
    torch.testing.assert_close(kept, full[keep])
    torch.testing.assert_close(target_token_losses(kept, batch["labels"]), token_losses(full, batch["labels"]))


def test_a_model_without_a_head_module_gets_its_full_logits_selected():
    table = torch.randn(VOCAB, VOCAB)
    model = lambda **kw: SimpleNamespace(logits=table[kw["input_ids"]])  # noqa: E731
    batch = _batch()
    keep = target_positions(batch["labels"])
    torch.testing.assert_close(forward_kept_logits(model, batch, keep), table[batch["input_ids"]][keep])


def test_target_positions_are_the_positions_before_a_target():
    labels = torch.tensor([[5, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    assert target_positions(labels).tolist() == [[False, True, True, False], [False, False, False, False]]

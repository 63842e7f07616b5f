"""Masked causal-LM cross-entropy, normalised by the target tokens of the whole global batch.

Averaging per micro-batch would weight a token in a short micro-batch more than one in a long one; instead every
rank sums token losses and divides by the number of target tokens across all ranks and all accumulation steps
(counted before the first forward of an optimizer step). Gradient averaging over ranks (DDP, FSDP) divides by
the world size, so each rank's loss is multiplied back by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftray.data.chat import IGNORE_INDEX
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens of a batch after the causal shift (position t predicts label t+1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-target cross-entropy (float32), shape [batch, seq-1], zero where the shifted label is ignored."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(shift_labels.shape)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: True at the positions whose logits the loss reads (the next label is a target)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def target_token_losses(target_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``token_losses`` from the logits at ``target_positions`` only ([targets, vocab], row-major): the same
    [batch, seq-1] float32 tensor, zero where the shifted label is ignored."""
    targets = labels[:, 1:] != IGNORE_INDEX
    target_labels = labels[:, 1:][targets]
    assert target_logits.shape[0] == target_labels.numel(), "logits must be those of target_positions(labels)"
    losses = F.cross_entropy(target_logits.float(), target_labels, reduction="none")
    return losses.new_zeros(targets.shape).masked_scatter(targets, losses)


def scaled_loss(token_loss: torch.Tensor, *, global_targets: int, world_size: int) -> torch.Tensor:
    """The value to backpropagate on one rank for one micro-batch: sum / global targets x world size."""
    return token_loss.sum() * (world_size / max(global_targets, 1))


def kind_sums(token_loss: torch.Tensor, labels: torch.Tensor, token_kind: torch.Tensor) -> dict[int, tuple[float, int]]:
    """(loss sum, target count) per token kind (``KIND_SFT``, ``KIND_PRETRAIN``), for logging the two losses apart."""
    targets = labels[:, 1:] != IGNORE_INDEX
    kinds = token_kind[:, 1:]
    out = {}
    for kind in (KIND_SFT, KIND_PRETRAIN):
        mask = targets & (kinds == kind)
        out[kind] = (float(token_loss.detach()[mask].sum()), int(mask.sum()))
    return out

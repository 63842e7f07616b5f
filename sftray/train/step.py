"""One optimizer step: the optimizer and LR schedule of a run, and the step over a group of micro-batches.

The training loop and the benchmarks both call these, so a benchmark measures the code that trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from sftray.config import TrainConfig
from sftray.core.forward import forward_kept_logits, forward_logits, to_device
from sftray.core.loss import (
    count_targets,
    kind_sums,
    scaled_loss,
    target_positions,
    target_token_losses,
    token_losses,
)
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT


class StepSum(IntEnum):
    """The slots of the float64 sums ``optimizer_step`` returns. One tensor, so the loop adds steps with one ``+=``
    and ranks with one all-reduce; losses are summed over target tokens (divide by the matching count)."""

    LOSS = 0
    TARGETS = 1
    SFT_LOSS = 2
    """Chat tokens' (``KIND_SFT``) loss."""
    SFT_TARGETS = 3
    PRETRAIN_LOSS = 4
    """Pretraining tokens' (``KIND_PRETRAIN``, mixed in by ``data.pretrain_mix``) loss."""
    PRETRAIN_TARGETS = 5


def mean_loss(sums: torch.Tensor, loss: StepSum, targets: StepSum) -> float:
    """The mean token loss of ``sums`` (``StepSum`` slots ``loss`` over ``targets``; 0 without a target)."""
    return float(sums[loss] / sums[targets].clamp(min=1))


SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
"""``train.schedule`` -> the transformers scheduler name (every schedule warms up first)."""


def build_optimizer(params: Iterable[torch.nn.Parameter], *, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params`` with the run's peak LR and decoupled weight decay."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))


def build_scheduler(optimizer: torch.optim.Optimizer, *, cfg: TrainConfig, total_steps: int) -> Any:
    """``train.schedule`` after a linear warm-up over ``train.warmup_ratio`` of ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULES[cfg.schedule],
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )


def optimizer_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    group: list[dict[str, torch.Tensor]],
    *,
    cfg: TrainConfig,
    device: torch.device,
    world: int,
    bf16: bool,
    full_head: bool = False,
) -> torch.Tensor:
    """One optimizer step over the micro-batches of ``group``; the loss is normalised by the global batch's targets.

    Uses ``cfg.parallelism`` (which gradient sync to skip) and ``cfg.max_grad_norm`` (clipping; 0 disables).
    The LM head runs only at target positions (as TRL's SFT loss does): an SFT row's prompt and padding positions
    never need the [positions, vocab] logits (pretraining windows, every token a target, gain nothing from it).
    ``full_head`` runs it at every position instead, as evaluation does; the loss and gradients are the same to
    float rounding (the bench compares the two).
    Returns this rank's float64 sums on ``device``, slots named by ``StepSum``.
    """
    targets = torch.tensor([sum(count_targets(b["labels"]) for b in group)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(targets)  # all ranks, all accumulation steps
    global_targets = int(targets.item())
    sums = torch.zeros(len(StepSum), dtype=torch.float64, device=device)
    for i, batch in enumerate(group):
        batch = to_device(batch, device)
        last = i == len(group) - 1
        with _grad_sync(model, parallelism=cfg.parallelism, enabled=last):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = _token_losses(model, batch, full_head=full_head)
            scaled_loss(losses, global_targets=global_targets, world_size=world).backward()
        per_kind = kind_sums(losses, batch["labels"], batch["token_kind"])
        values = {
            StepSum.LOSS: float(losses.detach().sum()),
            StepSum.TARGETS: count_targets(batch["labels"]),
            StepSum.SFT_LOSS: per_kind[KIND_SFT][0],
            StepSum.SFT_TARGETS: per_kind[KIND_SFT][1],
            StepSum.PRETRAIN_LOSS: per_kind[KIND_PRETRAIN][0],
            StepSum.PRETRAIN_TARGETS: per_kind[KIND_PRETRAIN][1],
        }
        sums += torch.tensor([values[slot] for slot in StepSum], dtype=torch.float64, device=device)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


def _token_losses(model: Any, batch: dict[str, torch.Tensor], *, full_head: bool) -> torch.Tensor:
    """[batch, seq-1] per-target losses of one micro-batch, from the full head or the head at targets only."""
    if full_head:
        return token_losses(forward_logits(model, batch), batch["labels"])
    keep = target_positions(batch["labels"])
    return target_token_losses(forward_kept_logits(model, batch, keep), batch["labels"])


@contextlib.contextmanager
def _grad_sync(model: Any, *, parallelism: str, enabled: bool):
    """Skips the gradient all-reduce on accumulation micro-batches (correct either way; this saves traffic)."""
    if parallelism == "ddp" and not enabled and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    if parallelism == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    yield

"""Evaluation inside Ray Train workers: losses on held-out rows and generation probes, reduced over all ranks.

Every rank runs the same number of forward passes (FSDP2 all-gathers parameters in each one), so probes are
dealt out evenly and generation uses ``synced_gpus`` to keep ranks stepping together until all have finished.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from sftray.eval.probes import judge
from sftray.train.loss import token_losses
from sftray.train.parallel import unwrap


def forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a collated batch; packed batches have no attention_mask (attention follows position_ids)."""
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
    ).logits


@torch.no_grad()
def heldout_loss(model: Any, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device) -> float:
    """Mean cross-entropy per target token over all ranks' batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        losses = token_losses(forward_logits(model, batch), batch["labels"])
        total[0] += losses.sum().double()
        total[1] += (batch["labels"][:, 1:] != -100).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def run_probes(
    model: Any,
    probes: list[dict],
    *,
    tokenizer: Any,
    device: torch.device,
    max_new_tokens: int,
    end_of_turn_id: int,
    user_opener: str,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy generation for each probe; returns (metrics, table rows) identical on every rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_rank = -(-len(probes) // world)
    mine = probes[rank * per_rank : (rank + 1) * per_rank]
    real = len(mine)
    mine = mine + [probes[0]] * (per_rank - real)  # equal work on every rank; fillers are not scored
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    if mine:
        width = max(len(p["prompt_ids"]) for p in mine)
        pad = tokenizer.pad_token_id
        ids = torch.tensor(
            [[pad] * (width - len(p["prompt_ids"])) + list(p["prompt_ids"]) for p in mine], device=device
        )
        mask = torch.tensor(
            [[0] * (width - len(p["prompt_ids"])) + [1] * len(p["prompt_ids"]) for p in mine], device=device
        )
        out = unwrap(model).generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn_id,
            pad_token_id=pad,
            synced_gpus=world > 1,
        )
        for probe, gen in zip(mine[:real], out[:real, width:].tolist()):
            verdict = judge(
                gen,
                tokenizer=tokenizer,
                end_of_turn_id=end_of_turn_id,
                user_opener=user_opener,
                reference=probe["reference"],
            )
            rows.append({"prompt": probe["prompt"], "reference": probe["reference"], **verdict})
    model.train(was_training)
    gathered: list[list[dict]] = [rows]
    if world > 1:
        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, rows)
    table = [r for part in gathered for r in part]
    n = max(len(table), 1)
    with_ref = [r for r in table if r["reference"] is not None]
    metrics = {
        "eval/format_compliance": sum(r["compliant"] for r in table) / n,
        "eval/ended": sum(r["ended"] for r in table) / n,
        "eval/exact_match": sum(r["exact_match"] for r in with_ref) / max(len(with_ref), 1),
    }
    return metrics, table

"""Evaluation inside Ray Train workers: losses on held-out rows and generation probes, reduced over all ranks.

Every rank runs the same number of forward passes (FSDP2 all-gathers parameters in each one), so probes are
dealt out evenly and generation uses ``synced_gpus`` to keep ranks stepping together until all have finished.

The eval rows are small by construction (``eval.max_eval_rows`` per set) and read every epoch, so each rank holds
its share in memory as Arrow rather than streaming it through Ray Data: a Ray Data shard costs a coordinator actor
per set at start-up and an execution per pass, each a delay before the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from sftray.core.forward import forward_logits, to_device
from sftray.core.loss import count_targets, token_losses
from sftray.core.parallel import unwrap
from sftray.eval.intervals import wilson
from sftray.eval.metrics import (
    ENDED,
    EXACT_MATCH,
    FORMAT_COMPLIANCE,
    PRETRAIN_LOSS,
    VAL_LOSS,
    lower_bound,
    stage_metric,
    upper_bound,
)
from sftray.eval.probes import judge


@dataclass(kw_only=True)
class Evaluator:
    """val/loss, held-out pretraining loss and generation probes of a (wrapped) model, identical on every rank."""

    model: Any
    tokenizer: Any
    device: torch.device
    collate: Callable[..., dict[str, torch.Tensor]]
    """Rows -> a collated micro-batch (as training collates them)."""
    val: pa.Table
    """This rank's share of the validation rows (``eval_share``)."""
    heldout: pa.Table
    """This rank's share of the held-out pretraining rows."""
    micro_batch_size: int
    probes: list[dict]
    max_new_tokens: int
    end_of_turn_id: int
    user_opener: str
    earlier_probes: dict[str, tuple[list[dict], int]] = field(default_factory=dict)
    """Multi-stage runs: each earlier stage's name -> (its probes, their generation limit), scored as
    ``eval/<stage>/...`` so a later stage shows what it undid of an earlier one (their rows join the table)."""

    def run(self) -> tuple[dict[str, float], list[dict]]:
        """(metrics, probe table rows); every rank must call it (the losses are all-reduced)."""
        metrics = {
            VAL_LOSS: heldout_loss(self.model, self._batches(self.val), device=self.device),
            PRETRAIN_LOSS: heldout_loss(self.model, self._batches(self.heldout), device=self.device),
        }
        table: list[dict] = []
        if self.probes:
            probe_metrics, table = run_probes(
                self.model,
                self.probes,
                tokenizer=self.tokenizer,
                device=self.device,
                max_new_tokens=self.max_new_tokens,
                end_of_turn_id=self.end_of_turn_id,
                user_opener=self.user_opener,
            )
            metrics.update(probe_metrics)
        for stage, (probes, limit) in self.earlier_probes.items():
            stage_metrics, stage_table = run_probes(
                self.model,
                probes,
                tokenizer=self.tokenizer,
                device=self.device,
                max_new_tokens=limit,
                end_of_turn_id=self.end_of_turn_id,
                user_opener=self.user_opener,
            )
            metrics.update({stage_metric(stage, k): v for k, v in stage_metrics.items()})
            table += [{"stage": stage, **row} for row in stage_table]
        return metrics, table

    def _batches(self, rows: pa.Table) -> Iterable[dict[str, torch.Tensor]]:
        size = self.micro_batch_size
        return (self.collate(rows.slice(i, size).to_pydict()) for i in range(0, rows.num_rows, size))


def eval_share(rows: pa.Table, *, rank: int, world: int) -> pa.Table:
    """Rank ``rank``'s contiguous share of ``rows``; the driver pads the set to a multiple of ``world`` rows so every
    rank runs the same number of forward passes."""
    if rows.num_rows % world:
        raise ValueError(f"{rows.num_rows} eval rows do not split evenly over {world} ranks")
    per = rows.num_rows // world
    return rows.slice(rank * per, per)


@torch.no_grad()
def heldout_loss(model: Any, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device) -> float:
    """Mean cross-entropy per target token over all ranks' batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = to_device(batch, device)
        losses = token_losses(forward_logits(model, batch), batch["labels"])
        total[0] += losses.sum().double()
        total[1] += count_targets(batch["labels"])
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
        generated = _generate(
            model,
            mine,
            tokenizer=tokenizer,
            device=device,
            max_new_tokens=max_new_tokens,
            end_of_turn_id=end_of_turn_id,
            synced=world > 1,
        )
        for probe, gen in zip(mine[:real], generated[:real]):
            verdict = judge(
                gen,
                tokenizer=tokenizer,
                end_of_turn_id=end_of_turn_id,
                user_opener=user_opener,
                reference=probe["reference"],
                pattern=probe.get("format"),
                answer_pattern=probe.get("answer_pattern"),
            )
            rows.append({"prompt": probe["prompt"], "reference": probe["reference"], **verdict})
    model.train(was_training)
    gathered: list[list[dict]] = [rows]
    if world > 1:
        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, rows)
    table = [r for part in gathered for r in part]
    return _probe_metrics(table), table


def _generate(
    model: Any,
    probes: list[dict],
    *,
    tokenizer: Any,
    device: torch.device,
    max_new_tokens: int,
    end_of_turn_id: int,
    synced: bool,
) -> list[list[int]]:
    """Greedy continuations (token ids after the prompt) of the probes' prompts, left-padded into one batch;
    ``synced``: keep stepping until every rank has finished (each step of an FSDP2 model is a collective)."""
    width = max(len(p["prompt_ids"]) for p in probes)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p["prompt_ids"])) + list(p["prompt_ids"]) for p in probes], device=device)
    mask = torch.tensor(
        [[0] * (width - len(p["prompt_ids"])) + [1] * len(p["prompt_ids"]) for p in probes], device=device
    )
    out = unwrap(model).generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=end_of_turn_id,
        pad_token_id=pad,
        synced_gpus=synced,
    )
    return out[:, width:].tolist()


def _probe_metrics(table: list[dict]) -> dict[str, float]:
    """Format compliance, ended and exact match over the probe table's verdicts (``judge``)."""
    n = max(len(table), 1)
    # Exact match counts the probes with an answer to compare: a reference, and its final answer when
    # eval.answer_pattern extracts one (a reference it cannot find an answer in is not a miss of the model).
    with_ref = [r for r in table if r["reference"] is not None and r.get("reference_answer", "") is not None]
    compliant, matched = sum(r["compliant"] for r in table), sum(r["exact_match"] for r in with_ref)
    metrics = {
        FORMAT_COMPLIANCE: compliant / n,
        ENDED: sum(r["ended"] for r in table) / n,
        EXACT_MATCH: matched / max(len(with_ref), 1),
    }
    # Each rate's 95% interval over its probes (sftray.eval.intervals): <metric>_lo / <metric>_hi.
    for metric, (k, count) in ((FORMAT_COMPLIANCE, (compliant, len(table))), (EXACT_MATCH, (matched, len(with_ref)))):
        metrics[lower_bound(metric)], metrics[upper_bound(metric)] = wilson(k, count)
    return metrics

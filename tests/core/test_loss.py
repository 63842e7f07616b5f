"""The loss: masked positions give zero gradient, and normalisation is by the global batch's target tokens.

The distributed case runs two real processes over gloo on loopback (no Ray): each rank holds micro-batches with
different target counts, and the gradient after the all-reduce must equal the gradient of one process that sees
the whole global batch and divides by its total target count.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sftray.core.loss import count_targets, kind_sums, scaled_loss, token_losses
from sftray.data.chat import IGNORE_INDEX

VOCAB = 11


def _logits_fn(weight: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return weight[input_ids]  # a bigram "model": logits depend only on the current token


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four micro-batches with deliberately uneven target counts (1, 5, 2, 7)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n_targets in (1, 5, 2, 7):
        ids = torch.randint(0, VOCAB, (1, 9), generator=g)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, 1 : 1 + n_targets] = ids[0, 1 : 1 + n_targets]
        out.append((ids, labels))
    return out


def _hand_loss(weight: torch.Tensor, batches) -> torch.Tensor:
    """Sum of -log p over every target of every micro-batch, divided by the total number of targets."""
    total, count = torch.zeros(()), 0
    for ids, labels in batches:
        logp = torch.log_softmax(_logits_fn(weight, ids)[0, :-1], dim=-1)
        for t in range(labels.shape[1] - 1):
            if labels[0, t + 1] != IGNORE_INDEX:
                total = total - logp[t, labels[0, t + 1]]
                count += 1
    return total / count


def test_count_targets_uses_the_causal_shift():
    labels = torch.tensor([[5, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1]])
    assert count_targets(labels) == 3  # position 0 is never a target


def test_masked_positions_contribute_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, VOCAB, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]])
    scaled_loss(token_losses(logits, labels), global_targets=2, world_size=1).backward()
    grad = logits.grad[0]
    # logits at t predict label t+1: only t=0 (label 2) and t=3 (label 7) carry loss
    assert grad[0].abs().sum() > 0 and grad[3].abs().sum() > 0
    for t in (1, 2, 4, 5):
        assert torch.equal(grad[t], torch.zeros(VOCAB)), f"masked position {t} got a gradient"


def test_single_process_accumulation_equals_hand_computation():
    torch.manual_seed(1)
    weight = torch.randn(VOCAB, VOCAB, requires_grad=True)
    batches = _batches()
    total = sum(count_targets(lab) for _, lab in batches)
    accumulated = 0.0
    for ids, labels in batches:
        loss = scaled_loss(token_losses(_logits_fn(weight, ids), labels), global_targets=total, world_size=1)
        loss.backward()
        accumulated += float(loss)
    grad = weight.grad.clone()
    weight.grad = None
    expected = _hand_loss(weight, batches)
    expected.backward()
    assert accumulated == pytest.approx(float(expected), rel=1e-6)
    assert torch.allclose(grad, weight.grad, atol=1e-7)
    # the per-micro-batch mean of means is a different number: the test distinguishes the two
    mean_of_means = sum(
        float(token_losses(_logits_fn(weight, i), lab).sum()) / count_targets(lab) for i, lab in batches
    ) / len(batches)
    assert abs(mean_of_means - float(expected)) > 1e-3


def test_kind_sums_split_chat_and_pretraining():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1, IGNORE_INDEX, 1]])
    kinds = torch.tensor([[1, 1, 2, 2, 2]])
    # targets are labels[1:] = [1, 1, -, 1] of kinds [1, 2, 2, 2]: chat gets loss 1, pretraining 2 + 4
    assert kind_sums(losses, labels, kinds) == {1: (1.0, 1), 2: (6.0, 2)}


def _worker(rank: int, port: int, weight: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        w = weight.clone().requires_grad_(True)
        mine = _batches()[rank * 2 : rank * 2 + 2]  # rank 0: 1 + 5 targets, rank 1: 2 + 7 targets
        local = torch.tensor([float(sum(count_targets(lab) for _, lab in mine))])
        dist.all_reduce(local)
        for ids, labels in mine:
            scaled_loss(
                token_losses(_logits_fn(w, ids), labels), global_targets=int(local.item()), world_size=2
            ).backward()
        dist.all_reduce(w.grad)
        w.grad /= 2  # what DDP / FSDP gradient averaging does
        # A numpy copy pickles by value; a tensor would travel as a shared-memory handle that
        # vanishes when this process exits before the parent unpickles it (FileNotFoundError).
        queue.put((rank, w.grad.numpy().copy()))
    finally:
        dist.destroy_process_group()


def test_two_ranks_uneven_targets_match_the_global_hand_computation():
    torch.manual_seed(2)
    weight = torch.randn(VOCAB, VOCAB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, weight, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads = {rank: torch.from_numpy(g) for rank, g in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    w = weight.clone().requires_grad_(True)
    _hand_loss(w, _batches()).backward()
    assert torch.allclose(grads[0], w.grad, atol=1e-7) and torch.allclose(grads[1], w.grad, atol=1e-7)

"""The optimizer step (sftray.train.step) in one process, on a bigram stand-in for a causal LM (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sftray.config import TrainConfig
from sftray.data.chat import IGNORE_INDEX
from sftray.data.packing import KIND_PRETRAIN, KIND_SFT
from sftray.train.step import StepSum, build_optimizer, build_scheduler, optimizer_step

VOCAB = 13


class _Bigram(torch.nn.Module):
    """Logits depend only on the current token; called with the keyword arguments ``forward_logits`` passes."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))

    def forward(self, *, input_ids, position_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def _batch(seed: int, *, width: int, kinds: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, width), generator=g)
    labels = ids.clone()
    labels[0, torch.rand(width, generator=g) < 0.3] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(width).unsqueeze(0),
        "token_kind": torch.tensor([kinds]),
    }


def test_build_optimizer_is_adamw_with_the_run_settings():
    cfg = TrainConfig(lr=3e-4, weight_decay=0.1)
    optimizer = build_optimizer(_Bigram().parameters(), cfg=cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3e-4, 0.1, (0.9, 0.999))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_scheduler_warms_up_then_follows_the_schedule(schedule: str):
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.2, schedule=schedule)
    optimizer = build_optimizer(_Bigram().parameters(), cfg=cfg)
    scheduler = build_scheduler(optimizer, cfg=cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3)  # round(0.2 x 10) = 2 warm-up steps
    assert (lrs[-1] == pytest.approx(1e-3)) == (schedule == "constant")


def test_accumulated_step_equals_one_step_over_the_whole_batch():
    """Two micro-batches of different target counts update the weights as one batch holding both does."""
    cfg = TrainConfig(parallelism="ddp", lr=1e-2, max_grad_norm=0.0)
    a = _batch(1, width=9, kinds=[KIND_SFT] * 9)
    b = _batch(2, width=9, kinds=[KIND_SFT] * 4 + [KIND_PRETRAIN] * 5)
    whole = {k: torch.cat([a[k], b[k]]) for k in a}
    cpu = torch.device("cpu")

    split_model, whole_model = _Bigram(), _Bigram()
    split_sums = optimizer_step(
        split_model,
        build_optimizer(split_model.parameters(), cfg=cfg),
        [a, b],
        cfg=cfg,
        device=cpu,
        world=1,
        bf16=False,
    )
    whole_sums = optimizer_step(
        whole_model,
        build_optimizer(whole_model.parameters(), cfg=cfg),
        [whole],
        cfg=cfg,
        device=cpu,
        world=1,
        bf16=False,
    )
    torch.testing.assert_close(split_model.table, whole_model.table)
    torch.testing.assert_close(split_sums, whole_sums)
    loss, targets, sft_loss, sft_targets, pt_loss, pt_targets = (float(split_sums[slot]) for slot in StepSum)
    assert targets == int((whole["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert sft_targets + pt_targets == targets and pt_targets > 0
    assert sft_loss + pt_loss == pytest.approx(loss)


class _Linear(torch.nn.Module):
    """Embedding -> Linear: a matmul, which bf16 autocast runs in bfloat16 (the bigram's lookup it would not)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, 8, generator=g))
        self.head = torch.nn.Linear(8, VOCAB)
        with torch.no_grad():  # the same start for every instance
            self.head.weight.copy_(torch.randn(VOCAB, 8, generator=g))
            self.head.bias.zero_()
        self.seen: list[torch.dtype] = []

    def forward(self, *, input_ids, position_ids, attention_mask=None, use_cache=False):
        logits = self.head(self.embed[input_ids])
        self.seen.append(logits.dtype)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(("precision", "compute"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_sets_the_compute_dtype_and_keeps_float32_weights(precision: str, compute: torch.dtype):
    """train.precision=bf16 runs the step under bf16 autocast on this CPU too; weights and their update stay
    float32, and the loss stays within bf16's rounding of the float32 loss."""
    from sftray.core.precision import use_bf16

    cpu = torch.device("cpu")
    cfg = TrainConfig(parallelism="ddp", lr=1e-2, precision=precision)
    batch = _batch(3, width=16, kinds=[KIND_SFT] * 16)
    model, reference = _Linear(), _Linear()
    sums = optimizer_step(
        model,
        build_optimizer(model.parameters(), cfg=cfg),
        [batch],
        cfg=cfg,
        device=cpu,
        world=1,
        bf16=use_bf16(cfg.precision, cpu),
    )
    ref = optimizer_step(
        reference,
        build_optimizer(reference.parameters(), cfg=cfg),
        [batch],
        cfg=cfg,
        device=cpu,
        world=1,
        bf16=False,
    )
    assert model.seen == [compute]
    assert model.head.weight.dtype == torch.float32 and model.embed.grad is None  # zeroed after the step
    loss, ref_loss = float(sums[StepSum.LOSS]), float(ref[StepSum.LOSS])
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert (loss == ref_loss) == (precision == "fp32")


def test_precision_auto_is_float32_on_cpu():
    from sftray.core.precision import use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) is False and use_bf16("fp32", cpu) is False and use_bf16("bf16", cpu) is True
    with pytest.raises(ValueError, match="train.precision='fp16'"):
        use_bf16("fp16", cpu)

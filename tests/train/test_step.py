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


# --- the LM head at target positions only, on the tiny Llama (plain and LoRA) ----------------------------------------

LLAMA_VOCAB = 50


def _tiny_llama(*, lora: bool) -> torch.nn.Module:
    """A 2-layer tiny Llama (tied head, as the builtin one), the same weights on every call; LoRA with the head
    trained in full too, so its gradient is compared."""
    from transformers import LlamaForCausalLM

    from sftray.config import LoraConfig
    from sftray.models.lora import apply_lora
    from sftray.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        tiny_llama_config(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    )
    if lora:
        model = apply_lora(model, cfg=LoraConfig(r=4, dropout=0.0, modules_to_save=["lm_head"]), new_token_ids=[])
        torch.manual_seed(1)
        with torch.no_grad():  # peft starts B at zero: a nonzero B gives A a gradient to compare
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    model.train()
    return model


def _llama_batch(seed: int, *, packed: bool, targets: bool = True) -> dict[str, torch.Tensor]:
    """Two rows of 12: packed (two examples per row, position_ids restarting, no attention_mask) or padded (a
    pad tail masked out); labels a random third of the tokens, or none at all."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, LLAMA_VOCAB, (2, 12), generator=g)
    labels = torch.where(torch.rand(2, 12, generator=g) < 0.35, ids, IGNORE_INDEX)
    kinds = torch.full((2, 12), KIND_SFT)
    kinds[1, 8:] = KIND_PRETRAIN
    batch = {"input_ids": ids, "token_kind": kinds}
    if packed:
        batch["position_ids"] = torch.tensor([list(range(5)) + list(range(7)), list(range(8)) + list(range(4))])
    else:
        batch["position_ids"] = torch.arange(12).repeat(2, 1)
        batch["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
        batch["attention_mask"][1, 9:] = 0
        labels[1, 9:] = IGNORE_INDEX
    batch["labels"] = labels if targets else torch.full_like(labels, IGNORE_INDEX)
    return batch


def _step_deltas(model, group, *, full_head: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's sums and every trainable parameter's change: SGD at lr 1 without clipping, so the change is
    minus the gradient."""
    cfg = TrainConfig(parallelism="ddp", max_grad_norm=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sums = optimizer_step(
        model, optimizer, group, cfg=cfg, device=torch.device("cpu"), world=1, bf16=False, full_head=full_head
    )
    return sums, {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_target_head_gives_the_full_head_loss_and_gradients(lora: bool, packed: bool):
    """Head at target positions only vs at every position: the same loss sums and gradients to float tolerance,
    over micro-batches with targets and one without any."""
    group = [
        _llama_batch(1, packed=packed),
        _llama_batch(2, packed=packed, targets=False),
        _llama_batch(3, packed=packed),
    ]
    full_sums, full = _step_deltas(_tiny_llama(lora=lora), group, full_head=True)
    sums, deltas = _step_deltas(_tiny_llama(lora=lora), group, full_head=False)
    torch.testing.assert_close(sums, full_sums, rtol=1e-6, atol=1e-6)
    assert full_sums[StepSum.TARGETS] > 0 and full_sums[StepSum.PRETRAIN_TARGETS] > 0
    assert full.keys() == deltas.keys() and any("lora_A" in n for n in full) == lora
    for name, delta in deltas.items():
        assert full[name].abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(delta, full[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_head_sees_only_the_target_positions(lora: bool):
    """The training step applies the LM head to the hidden states of target positions only (none for a
    micro-batch without targets); the full head sees every position."""
    model = _tiny_llama(lora=lora)
    seen: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    group = [_llama_batch(1, packed=True), _llama_batch(2, packed=True, targets=False)]
    _step_deltas(model, group, full_head=False)
    assert seen == [(1, int((group[0]["labels"][:, 1:] != IGNORE_INDEX).sum()), LLAMA_VOCAB), (1, 0, LLAMA_VOCAB)]
    seen.clear()
    _step_deltas(model, group, full_head=True)
    assert seen == [(2, 12, LLAMA_VOCAB)] * 2


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process: enough for DDP and FSDP2 to wrap and run their hooks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 parameters are DTensors


@pytest.mark.parametrize(("parallelism", "lora"), [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_target_head_under_ddp_and_fsdp2(one_rank_group, parallelism: str, lora: bool):
    """Through the DDP and FSDP2 wrappers (sftray.core.parallel.wrap), the head at targets gives the full head's
    loss and gradients, and the head still sees only the target positions."""
    from sftray.core.parallel import unwrap, wrap

    group = [_llama_batch(1, packed=True), _llama_batch(2, packed=True, targets=False)]
    results = []
    for full_head in (True, False):
        model = wrap(
            _tiny_llama(lora=lora), parallelism=parallelism, device=torch.device("cpu"), world_size=1, bf16=False
        )
        seen: list[int] = []
        unwrap(model).get_output_embeddings().register_forward_hook(
            lambda m, a, out, seen=seen: seen.append(out.shape[-2])
        )
        sums, deltas = _step_deltas(model, group, full_head=full_head)
        results.append((sums, {n: _local(d) for n, d in deltas.items()}, seen))
    (full_sums, full, full_seen), (sums, deltas, seen) = results
    assert full_seen == [12, 12] and seen == [int((group[0]["labels"][:, 1:] != IGNORE_INDEX).sum()), 0]
    torch.testing.assert_close(sums, full_sums, rtol=1e-6, atol=1e-6)
    for name, delta in deltas.items():
        torch.testing.assert_close(delta, full[name], rtol=1e-5, atol=1e-6, msg=name)

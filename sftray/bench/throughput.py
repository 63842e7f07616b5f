"""Training throughput: sftray's step path versus TRL's ``SFTTrainer`` on the same model, data, threads and steps.

Ten configurations train the same random tiny Llama (full fine-tuning, CPU) on the same examples for the same
number of optimizer steps, with the same optimizer (``torch.optim.AdamW``, no weight decay), constant learning
rate, gradient clipping at 1.0 and no gradient checkpointing. Weights and optimizer state are float32 everywhere
(the bf16 rows autocast the forward):

- sftray packed / padded: sftray's own per-step code, in this process: micro-batches exactly as
  ``sftray.train.loop`` builds them (length-grouped, padded to the longest row), the optimizer of
  ``sftray.train.step.build_optimizer`` and the loop's ``optimizer_step`` (``forward_kept_logits``: the LM head
  at target positions only, ``target_token_losses``, ``scaled_loss``, clipping, AdamW). In-process rather than
  through ``run_training`` because a Ray Train run adds worker start-up, evals and checkpoints that TRL's loop
  does not have; those costs are measured apart (``sftray.bench.overhead``), and the step math is the same
  function;
- sftray packed, bf16 autocast: the same path with ``optimizer_step(..., bf16=True)``, which runs the forward
  under ``torch.autocast(device.type, torch.bfloat16)`` (on CPU here); the loss is still float32. Reported like the
  others, never a TRL-best candidate;
- TRL default (padding), TRL packing (BFD, which implies padding-free batches) and TRL padding_free: ``SFTTrainer``
  with a pre-tokenized dataset (``input_ids`` + ``labels``), so it trains on exactly the tokens sftray trains on;
- TRL padded + group_by_length: the default padding collator over length-grouped batches. transformers 5 removed
  ``TrainingArguments.group_by_length``; its replacement is ``train_sampling_strategy="group_by_length"`` (the same
  ``LengthGroupedSampler``). It sorts megabatches of min(50, batches per epoch // 4) optimizer batches by length,
  so on this bench's epoch of only ``steps`` batches (3 to 12) it groups 1 to 3 batches at a time: little or no
  less padding than the default here, unlike on an epoch of hundreds of steps;
- TRL in bf16 (BFD at batch 1 x grad accum, and BFD packing): ``SFTConfig(bf16=True)``, TRL's own default,
  compared with sftray's bf16 row and never a float32 candidate;
- TRL BFD, batch 1 x grad accum: TRL's BFD rows one per micro-batch (so they stay apart instead of being flattened
  into one padding-free row), ``gradient_accumulation_steps`` = sftray packed's rows per step. TRL's and sftray's
  BFD may pack an epoch into different row counts, so ``choose_examples`` also keeps only epochs whose TRL row count
  takes exactly ``steps`` steps at sftray's rows per step; the epoch's tokens and targets are then the same.

Every configuration trains one epoch over the same example set in exactly ``steps`` optimizer steps; rows per
step are ceil(rows / steps), so every step carries about the same number of real tokens (the batch token budget).
The timed window is that whole epoch (from the first batch to the end of the last optimizer step); warm-up runs
(float32 and bf16) before the first configuration keep one-off process and kernel costs out. The bench asserts that
every configuration trained on the same number of target tokens (label != -100 after the causal shift) and real
tokens. TRL's best configuration is the TRL one of highest median target tokens/s; the summary holds sftray
packed's ratio to it.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftray.bench.workload import SEED, fitting, shuffled, trl_dataset
from sftray.data.chat import IGNORE_INDEX

SECTION = "throughput"
LR = 1e-4
"""Learning rate of every configuration (sftray's full fine-tuning default)."""
MAX_GRAD_NORM = 1.0
"""Gradient clipping of every configuration (sftray's and TrainingArguments' default)."""
SFTRAY_PACKED = "sftray packed"
SFTRAY_PADDED = "sftray padded"
SFTRAY_BF16 = "sftray packed, bf16 autocast"
SFTRAY_CONFIGS = (SFTRAY_PACKED, SFTRAY_PADDED, SFTRAY_BF16)
TRL_BF16 = "TRL BFD, batch 1 x grad accum, bf16"
TRL_BF16_PACKING = "TRL packing (BFD), bf16"


@dataclass(frozen=True)
class TrlSetup:
    """How one TRL configuration differs from ``SFTConfig``'s defaults (besides what every configuration sets)."""

    packing: bool = False
    padding_free: bool = False
    group_by_length: bool = False
    one_row_micro_batches: bool = False
    """Micro-batches of one row, accumulated to sftray packed's rows per step."""
    bf16: bool = False
    """bf16 autocast (TRL's default), compared with sftray's bf16 row, not a float32 candidate."""


TRL_SETUPS = {
    "TRL default (padding)": TrlSetup(),
    "TRL packing (BFD)": TrlSetup(packing=True),
    "TRL padding_free": TrlSetup(padding_free=True),
    "TRL padded + group_by_length": TrlSetup(group_by_length=True),
    "TRL BFD, batch 1 x grad accum": TrlSetup(packing=True, one_row_micro_batches=True),
    TRL_BF16: TrlSetup(packing=True, one_row_micro_batches=True, bf16=True),
    TRL_BF16_PACKING: TrlSetup(packing=True, bf16=True),
}
TRL_CONFIGS = tuple(name for name, setup in TRL_SETUPS.items() if not setup.bf16)
"""The candidates of ``trl_best`` (float32, like sftray's default)."""
TRL_BF16_CONFIGS = tuple(name for name, setup in TRL_SETUPS.items() if setup.bf16)
"""TRL in bf16 autocast, the comparison for sftray's bf16 row."""
CONFIGS = SFTRAY_CONFIGS + tuple(TRL_SETUPS)
"""Configuration names, in table order."""
SUMMARY_KEYS = ("train_in_process_over_best_trl", "trl_best_config", "train_bf16_over_best_trl_bf16")
"""This part's keys of the bench's top-level summary."""


def measure_throughput(
    *,
    examples: Sequence[dict],
    model_dir: Path,
    max_seq_len: int,
    rows_per_step: int,
    steps: int,
    threads: int,
    repeats: int,
) -> tuple[list[dict], dict[str, Any]]:
    """One row per configuration: median target / real tokens per second over ``repeats`` epochs of ``examples``
    (from ``choose_examples``), and the ratio of each median to TRL's best configuration; and the summary
    (``SUMMARY_KEYS``)."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chosen = list(examples)  # every configuration's epoch
    for bf16 in (False, True):  # warm-up: thread pools, allocator, lazy imports, bf16 kernels
        _sftray_epoch(
            chosen[: 2 * rows_per_step],
            model_dir=model_dir,
            tokenizer=tokenizer,
            packed=True,
            bf16=bf16,
            steps=2,
            max_seq_len=max_seq_len,
        )
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="sftray-bench-trl-") as tmp:
        for r in range(repeats):
            for name in CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]:  # rotate: drift spreads evenly
                run = _epoch(
                    name,
                    chosen,
                    model_dir=model_dir,
                    tokenizer=tokenizer,
                    steps=steps,
                    max_seq_len=max_seq_len,
                    out_dir=Path(tmp),
                )
                assert torch.get_num_threads() == threads, (name, torch.get_num_threads())
                runs[name].append(run)
    _check_same_work(runs, steps=steps)
    medians = {name: statistics.median(r["target_tokens"] / r["seconds"] for r in runs[name]) for name in CONFIGS}
    summary = summarize(medians)
    common = {"examples": len(chosen), "max_seq_len": max_seq_len, "threads": threads}
    rows = [
        _row(name, runs[name], ratio=medians[name] / medians[summary["trl_best_config"]], summary=summary, **common)
        for name in CONFIGS
    ]
    return rows, summary


def summarize(medians: dict[str, float]) -> dict[str, Any]:
    """``SUMMARY_KEYS`` from median target tokens/s per configuration: the best float32 TRL configuration and
    sftray packed's figure over it, and sftray's bf16 row over the better of TRL's bf16 ones."""
    best = max(TRL_CONFIGS, key=lambda name: medians[name])
    best_bf16 = max(TRL_BF16_CONFIGS, key=lambda name: medians[name])
    return {
        "train_in_process_over_best_trl": medians[SFTRAY_PACKED] / medians[best],
        "trl_best_config": best,
        "train_bf16_over_best_trl_bf16": medians[SFTRAY_BF16] / medians[best_bf16],
    }


def choose_examples(examples: Sequence[dict], *, max_seq_len: int, rows_per_step: int, steps: int) -> list[dict]:
    """The epoch every configuration trains on: about ``steps x rows_per_step`` packed rows of examples, trimmed so
    that every configuration's rows per step give exactly ``steps`` steps (see ``_takes_steps``)."""
    kept = shuffled(fitting(examples, max_seq_len=max_seq_len))
    budget = steps * rows_per_step * max_seq_len  # tokens of that many full rows
    n, tokens = 0, 0
    while n < len(kept) and tokens + len(kept[n]["input_ids"]) <= budget * 0.98:  # BFD fills rows to ~98%+
        tokens += len(kept[n]["input_ids"])
        n += 1
    while n >= steps:
        if _takes_steps(kept[:n], max_seq_len=max_seq_len, steps=steps):
            return kept[:n]
        n -= 1
    raise ValueError(f"{len(kept)} examples of <= {max_seq_len} tokens are too few for {steps} steps")


def _takes_steps(examples: Sequence[dict], *, max_seq_len: int, steps: int) -> bool:
    """Whether every configuration trains ``examples`` in exactly ``steps`` steps: examples, sftray's and TRL's
    packed rows at ceil(rows / steps) rows per step, and TRL's packed rows at sftray packed's rows per step (the
    batch 1 x grad accum configuration)."""
    sftray_rows, trl_rows = _sftray_packed_rows(examples, max_seq_len), _trl_packed_rows(examples, max_seq_len)
    own = all(math.ceil(c / _per_step(c, steps)) == steps for c in (len(examples), sftray_rows, trl_rows))
    return own and math.ceil(trl_rows / _per_step(sftray_rows, steps)) == steps


def _per_step(rows: int, steps: int) -> int:
    return math.ceil(rows / steps)


def _epoch(name: str, examples: Sequence[dict], *, out_dir: Path, **kwargs: Any) -> dict[str, Any]:
    if name in SFTRAY_CONFIGS:
        return _sftray_epoch(examples, packed=name != SFTRAY_PADDED, bf16=name == SFTRAY_BF16, **kwargs)
    return _trl_epoch(examples, name=name, out_dir=out_dir, **kwargs)


def _check_same_work(runs: dict[str, list[dict]], *, steps: int) -> None:
    """Every run of every configuration took ``steps`` steps over the same target and real tokens."""
    reference = runs[CONFIGS[0]][0]
    for name, name_runs in runs.items():
        for run in name_runs:
            assert run["steps"] == steps, (name, run["steps"], steps)
            assert run["target_tokens"] == reference["target_tokens"], (name, run["target_tokens"], reference)
            assert run["tokens"] == reference["tokens"], (name, run["tokens"], reference["tokens"])


def _row(name: str, runs: list[dict], *, ratio: float, summary: dict[str, Any], **common: Any) -> dict[str, Any]:
    first = runs[0]
    seconds = [r["seconds"] for r in runs]
    return {
        "section": SECTION,
        "name": name,
        "target_tokens_per_s": _figure([first["target_tokens"] / s for s in seconds], "tokens/s"),
        "tokens_per_s": _figure([first["tokens"] / s for s in seconds], "tokens/s"),
        "slots_per_s": _figure([first["slots"] / s for s in seconds], "positions/s"),
        "epoch_seconds": _figure(seconds, "s"),
        "ratio_to_trl_best": ratio,
        "trl_best": summary["trl_best_config"],
        "steps": first["steps"],
        "rows_per_step": first["rows_per_step"],
        "rows_per_micro_batch": first["rows_per_micro_batch"],
        "target_tokens": first["target_tokens"],
        "tokens": first["tokens"],
        "slots": first["slots"],
        "efficiency": first["tokens"] / first["slots"],
        **common,
    }


# --- sftray ------------------------------------------------------------------------------------------------------


def _sftray_packed_rows(examples: Sequence[dict], max_seq_len: int) -> int:
    from sftray.data.packing import pack_examples

    return len(pack_examples(examples, max_seq_len=max_seq_len))


def _sftray_epoch(
    examples: Sequence[dict],
    *,
    model_dir: Path,
    tokenizer: Any,
    packed: bool,
    bf16: bool,
    steps: int,
    max_seq_len: int,
) -> dict[str, Any]:
    import random

    import torch

    from sftray.bench.packing import sftray_micro_batches
    from sftray.config import TrainConfig
    from sftray.core.loss import count_targets
    from sftray.data.packing import pack_examples, pad_examples
    from sftray.models.loading import load_model
    from sftray.train.step import build_optimizer, optimizer_step

    rows = pack_examples(examples, max_seq_len=max_seq_len, seed=SEED) if packed else pad_examples(examples)
    if not packed:
        random.Random(SEED).shuffle(rows)
    per_step = _per_step(len(rows), steps)
    torch.manual_seed(SEED)
    model, _ = load_model(str(model_dir), tokenizer=tokenizer)
    model.train()
    cfg = TrainConfig(method="full", parallelism="ddp", lr=LR, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg=cfg)
    device = torch.device("cpu")
    targets = tokens = slots = done = 0
    started = time.perf_counter()
    for batch in sftray_micro_batches(rows, size=per_step, pad_id=tokenizer.pad_token_id, packed=packed):
        # bf16 autocasts the forward for device.type (CPU here); weights and AdamW state stay float32.
        optimizer_step(model, optimizer, [batch], cfg=cfg, device=device, world=1, bf16=bf16)
        targets += count_targets(batch["labels"])
        tokens += int((batch["token_kind"] > 0).sum())
        slots += batch["input_ids"].numel()
        done += 1
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "steps": done,
        "rows_per_step": per_step,
        "rows_per_micro_batch": per_step,
        "target_tokens": targets,
        "tokens": tokens,
        "slots": slots,
    }


# --- TRL ---------------------------------------------------------------------------------------------------------


def _trl_packed_rows(examples: Sequence[dict], max_seq_len: int) -> int:
    from trl.data_utils import pack_dataset

    return len(pack_dataset(trl_dataset(examples), max_seq_len, strategy="bfd", map_kwargs={"keep_in_memory": True}))


def trl_layout(name: str, examples: Sequence[dict], *, steps: int, max_seq_len: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per optimizer step) of TRL configuration ``name`` on ``examples``."""
    setup = TRL_SETUPS[name]
    if setup.one_row_micro_batches:
        return 1, _per_step(_sftray_packed_rows(examples, max_seq_len), steps)
    rows = _trl_packed_rows(examples, max_seq_len) if setup.packing else len(examples)
    return _per_step(rows, steps), 1


def trl_args(
    name: str, *, batch: int, grad_accum: int, steps: int, max_seq_len: int, out_dir: Path, epochs: int | None = None
) -> Any:
    """The ``SFTConfig`` of TRL configuration ``name``: ``steps`` optimizer steps, or ``epochs`` whole epochs."""
    from trl import SFTConfig

    setup = TRL_SETUPS[name]
    return SFTConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps if epochs is None else -1,
        num_train_epochs=epochs or 1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",  # sftray's optimizer; TRL's own default on torch >= 2.8 is the fused AdamW kernel
        bf16=setup.bf16,  # float32 like sftray's default (SFTConfig defaults to bf16); bf16 rows autocast both
        gradient_checkpointing=False,  # sftray's default (SFTConfig defaults to True)
        use_cpu=True,
        packing=setup.packing,
        packing_strategy="bfd",
        padding_free=setup.padding_free,
        # transformers 5's spelling of the removed TrainingArguments.group_by_length=True.
        train_sampling_strategy="group_by_length" if setup.group_by_length else "random",
        max_length=None if setup.padding_free else max_seq_len,  # padding_free without packing refuses a max_length
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        dataset_num_proc=None,
    )


class _CountingCollator:
    """TRL's own collator, unchanged; records what each batch it builds holds (the trainer's real batches)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[dict[str, int]] = []

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.batches.append(
            {
                # Targets after the causal shift, as sftray.core.loss.count_targets counts them.
                "target_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
                "tokens": int(mask.sum()) if mask is not None else batch["input_ids"].numel(),  # padding-free: none
                "slots": batch["input_ids"].numel(),
            }
        )
        return batch


def _trl_trainer(
    examples: Sequence[dict],
    *,
    name: str,
    model_dir: Path,
    tokenizer: Any,
    steps: int,
    max_seq_len: int,
    out_dir: Path,
    epochs: int | None = None,
) -> tuple[Any, _CountingCollator, dict[str, Any], int]:
    """TRL configuration ``name``'s trainer on ``examples``, with its counting collator, its clock (``start``:
    training began, ``epochs``: [start, end] of each epoch's first batch to last optimizer step, ``steps``) and its
    micro-batches per step."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    batch, grad_accum = trl_layout(name, examples, steps=steps, max_seq_len=max_seq_len)
    args = trl_args(
        name, batch=batch, grad_accum=grad_accum, steps=steps, max_seq_len=max_seq_len, out_dir=out_dir, epochs=epochs
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    clock: dict[str, Any] = {"epochs": []}

    class _Clock(TrainerCallback):
        """Wall time from the start of training (and of each epoch) to the end of the latest optimizer step."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["epochs"].append([time.perf_counter(), None])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock["end"] = clock["epochs"][-1][1] = time.perf_counter()
            clock["steps"] = state.global_step

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=trl_dataset(examples),
        processing_class=tokenizer,
        callbacks=[_Clock()],
    )
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    return trainer, counter, clock, batch * grad_accum


def _trl_epoch(
    examples: Sequence[dict], *, name: str, model_dir: Path, tokenizer: Any, steps: int, max_seq_len: int, out_dir: Path
) -> dict[str, Any]:
    trainer, counter, clock, per_step = _trl_trainer(
        examples,
        name=name,
        model_dir=model_dir,
        tokenizer=tokenizer,
        steps=steps,
        max_seq_len=max_seq_len,
        out_dir=out_dir,
    )
    trainer.train()
    micro = per_step // trainer.args.per_device_train_batch_size
    batches = counter.batches[: steps * micro]  # the dataloader may build one batch ahead
    return {
        "seconds": clock["end"] - clock["start"],
        "steps": int(clock["steps"]),
        "rows_per_step": per_step,
        "rows_per_micro_batch": trainer.args.per_device_train_batch_size,
        "target_tokens": sum(b["target_tokens"] for b in batches),
        "tokens": sum(b["tokens"] for b in batches),
        "slots": sum(b["slots"] for b in batches),
    }


def trl_epoch_rates(
    examples: Sequence[dict], *, name: str, model_dir: Path, steps: int, max_seq_len: int, epochs: int, out_dir: Path
) -> list[float]:
    """Target tokens per second of each of ``epochs`` epochs of TRL configuration ``name`` on ``examples`` at
    ``steps`` optimizer steps per epoch (the targets: labels != -100 after each example's first token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer, _, clock, _ = _trl_trainer(
        examples,
        name=name,
        model_dir=model_dir,
        tokenizer=tokenizer,
        steps=steps,
        max_seq_len=max_seq_len,
        out_dir=out_dir,
        epochs=epochs,
    )
    trainer.train()
    targets = sum(sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX) for ex in examples)
    return [targets / (end - start) for start, end in clock["epochs"]]


def _figure(values: list[float], unit: str) -> dict[str, Any]:
    return {"values": values, "median": statistics.median(values), "unit": unit}

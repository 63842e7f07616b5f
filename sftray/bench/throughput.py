"""Training throughput: sftray's step path versus TRL's ``SFTTrainer`` on the same model, data, threads and steps.

Five configurations train the same random tiny Llama (full fine-tuning, float32, CPU) on the same examples for
the same number of optimizer steps, with the same optimizer (``torch.optim.AdamW``, no weight decay), constant
learning rate, gradient clipping at 1.0 and no gradient checkpointing:

- sftray packed / padded: sftray's own per-step code, in this process: micro-batches exactly as
  ``sftray.train.loop`` builds them (length-grouped, padded to the longest row), the optimizer of
  ``sftray.train.step.build_optimizer`` and the loop's ``optimizer_step`` (``forward_logits``, ``token_losses``,
  ``scaled_loss``, clipping, AdamW). In-process rather than through ``run_training`` because a Ray Train run adds
  worker start-up, evals and checkpoints that TRL's loop does not have; those costs are measured apart
  (``sftray.bench.overhead``), and the step math is the same function;
- TRL default (padding), TRL packing (BFD, which implies padding-free batches) and TRL padding_free: ``SFTTrainer``
  with a pre-tokenized dataset (``input_ids`` + ``labels``), so it trains on exactly the tokens sftray trains on.

Every configuration trains one epoch over the same example set in exactly ``steps`` optimizer steps; rows per
step are ceil(rows / steps), so every step carries about the same number of real tokens (the batch token budget).
The timed window is that whole epoch (from the first batch to the end of the last optimizer step); a warm-up run
before the first configuration keeps one-off process costs out. The bench asserts that every configuration
trained on the same number of target tokens (label != -100 after the causal shift) and real tokens.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftray.bench.workload import SEED, fitting, shuffled, trl_dataset
from sftray.data.chat import IGNORE_INDEX

SECTION = "throughput"
LR = 1e-4
"""Learning rate of every configuration (sftray's full fine-tuning default)."""
MAX_GRAD_NORM = 1.0
"""Gradient clipping of every configuration (sftray's and TrainingArguments' default)."""
CONFIGS = (
    "sftray packed",
    "sftray padded",
    "TRL default (padding)",
    "TRL packing (BFD)",
    "TRL padding_free",
)
"""Configuration names, in table order."""
TRL_CONFIGS = CONFIGS[2:]


def measure_throughput(
    *,
    examples: Sequence[dict],
    model_dir: Path,
    max_seq_len: int,
    rows_per_step: int,
    steps: int,
    threads: int,
    repeats: int,
) -> list[dict]:
    """One row per configuration: median target / real tokens per second over ``repeats`` epochs of ``examples``
    (from ``choose_examples``), and the ratio of each median to TRL's best configuration."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chosen = list(examples)  # every configuration's epoch
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    _sftray_epoch(
        chosen[: 2 * rows_per_step],
        model_dir=model_dir,
        tokenizer=tokenizer,
        packed=True,
        steps=2,
        max_seq_len=max_seq_len,
    )  # warm-up: thread pools, allocator, lazy imports
    with tempfile.TemporaryDirectory(prefix="sftray-bench-trl-") as tmp:
        for r in range(repeats):
            for name in CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]:  # rotate: drift spreads evenly
                if name.startswith("sftray"):
                    run = _sftray_epoch(
                        chosen,
                        model_dir=model_dir,
                        tokenizer=tokenizer,
                        packed=name == "sftray packed",
                        steps=steps,
                        max_seq_len=max_seq_len,
                    )
                else:
                    run = _trl_epoch(
                        chosen,
                        name=name,
                        model_dir=model_dir,
                        tokenizer=tokenizer,
                        steps=steps,
                        max_seq_len=max_seq_len,
                        out_dir=Path(tmp),
                    )
                assert torch.get_num_threads() == threads, (name, torch.get_num_threads())
                runs[name].append(run)

    reference = runs[CONFIGS[0]][0]
    for name, name_runs in runs.items():
        for run in name_runs:
            assert run["steps"] == steps, (name, run["steps"], steps)
            assert run["target_tokens"] == reference["target_tokens"], (name, run["target_tokens"], reference)
            assert run["tokens"] == reference["tokens"], (name, run["tokens"], reference["tokens"])

    medians = {name: statistics.median(r["target_tokens"] / r["seconds"] for r in runs[name]) for name in CONFIGS}
    best_trl = max(TRL_CONFIGS, key=lambda n: medians[n])
    rows = []
    for name in CONFIGS:
        first = runs[name][0]
        seconds = [r["seconds"] for r in runs[name]]
        rows.append(
            {
                "section": SECTION,
                "name": name,
                "target_tokens_per_s": _figure([first["target_tokens"] / s for s in seconds], "tokens/s"),
                "tokens_per_s": _figure([first["tokens"] / s for s in seconds], "tokens/s"),
                "slots_per_s": _figure([first["slots"] / s for s in seconds], "positions/s"),
                "epoch_seconds": _figure(seconds, "s"),
                "ratio_to_trl_best": medians[name] / medians[best_trl],
                "trl_best": best_trl,
                "steps": first["steps"],
                "rows_per_step": first["rows_per_step"],
                "examples": len(chosen),
                "target_tokens": first["target_tokens"],
                "tokens": first["tokens"],
                "slots": first["slots"],
                "efficiency": first["tokens"] / first["slots"],
                "max_seq_len": max_seq_len,
                "threads": threads,
            }
        )
    return rows


def choose_examples(examples: Sequence[dict], *, max_seq_len: int, rows_per_step: int, steps: int) -> list[dict]:
    """The epoch every configuration trains on: about ``steps x rows_per_step`` packed rows of examples, trimmed so
    that ceil(rows / steps) rows per step gives exactly ``steps`` steps for every configuration's row count."""
    from sftray.data.packing import pack_examples

    kept = shuffled(fitting(examples, max_seq_len=max_seq_len))
    budget = steps * rows_per_step * max_seq_len  # tokens of that many full rows
    n, tokens = 0, 0
    while n < len(kept) and tokens + len(kept[n]["input_ids"]) <= budget * 0.98:  # BFD fills rows to ~98%+
        tokens += len(kept[n]["input_ids"])
        n += 1
    while n >= steps:
        subset = kept[:n]
        counts = (n, len(pack_examples(subset, max_seq_len=max_seq_len)), _trl_packed_rows(subset, max_seq_len))
        if all(math.ceil(c / math.ceil(c / steps)) == steps for c in counts):
            return subset
        n -= 1
    raise ValueError(f"{len(kept)} examples of <= {max_seq_len} tokens are too few for {steps} steps")


# --- sftray ------------------------------------------------------------------------------------------------------


def _sftray_epoch(
    examples: Sequence[dict], *, model_dir: Path, tokenizer: Any, packed: bool, steps: int, max_seq_len: int
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
    per_step = math.ceil(len(rows) / steps)
    torch.manual_seed(SEED)
    model, _ = load_model(str(model_dir), tokenizer=tokenizer)
    model.train()
    cfg = TrainConfig(method="full", parallelism="ddp", lr=LR, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg=cfg)
    device = torch.device("cpu")
    targets = tokens = slots = done = 0
    started = time.perf_counter()
    for batch in sftray_micro_batches(rows, size=per_step, pad_id=tokenizer.pad_token_id, packed=packed):
        optimizer_step(model, optimizer, [batch], cfg=cfg, device=device, world=1, bf16=False)
        targets += count_targets(batch["labels"])
        tokens += int((batch["token_kind"] > 0).sum())
        slots += batch["input_ids"].numel()
        done += 1
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "steps": done,
        "rows_per_step": per_step,
        "target_tokens": targets,
        "tokens": tokens,
        "slots": slots,
    }


# --- TRL ---------------------------------------------------------------------------------------------------------


def _trl_packed_rows(examples: Sequence[dict], max_seq_len: int) -> int:
    from trl.data_utils import pack_dataset

    return len(pack_dataset(trl_dataset(examples), max_seq_len, strategy="bfd", map_kwargs={"keep_in_memory": True}))


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


def _trl_epoch(
    examples: Sequence[dict], *, name: str, model_dir: Path, tokenizer: Any, steps: int, max_seq_len: int, out_dir: Path
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    packing, padding_free = name == "TRL packing (BFD)", name == "TRL padding_free"
    rows = _trl_packed_rows(examples, max_seq_len) if packing else len(examples)
    per_step = math.ceil(rows / steps)
    args = SFTConfig(
        output_dir=str(out_dir / "trl"),
        per_device_train_batch_size=per_step,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",  # sftray's optimizer; TRL's own default on torch >= 2.8 is the fused AdamW kernel
        bf16=False,  # float32 like sftray on CPU (SFTConfig defaults to bf16)
        gradient_checkpointing=False,  # sftray's default (SFTConfig defaults to True)
        use_cpu=True,
        packing=packing,
        packing_strategy="bfd",
        padding_free=padding_free,
        max_length=None if padding_free else max_seq_len,  # padding_free without packing refuses a max_length
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        dataset_num_proc=None,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    times: dict[str, float] = {}

    class _Clock(TrainerCallback):
        """Wall time from the start of training to the end of the latest optimizer step."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times["start"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times["end"] = time.perf_counter()
            times["steps"] = state.global_step

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=trl_dataset(examples),
        processing_class=tokenizer,
        callbacks=[_Clock()],
    )
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    batches = counter.batches[:steps]  # the dataloader may build one batch ahead
    return {
        "seconds": times["end"] - times["start"],
        "steps": int(times["steps"]),
        "rows_per_step": per_step,
        "target_tokens": sum(b["target_tokens"] for b in batches),
        "tokens": sum(b["tokens"] for b in batches),
        "slots": sum(b["slots"] for b in batches),
    }


def _figure(values: list[float], unit: str) -> dict[str, Any]:
    return {"values": values, "median": statistics.median(values), "unit": unit}

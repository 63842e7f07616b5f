"""The builtin base model: a tiny Llama pretrained from scratch on pydoc prose, cached as an ordinary HF folder.

``builtin:tiny-llama`` needs weights that already know some English, or SFT and forgetting measurements
start from noise. ``pretrain_tiny`` trains one on CPU in a few minutes (next-token loss on the train topics of
``pydoc_topics_split()``, its loss reported on the held-out topics, which it never trains on and on which the mix
measures forgetting); ``ensure_tiny_model`` builds it once per cache dir.
The held-out loss is reported next to a unigram baseline, so "it learned something" is a number, not a hope.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sftray.data.builtin import pydoc_topics_split
from sftray.models.cache import build_once
from sftray.models.tiny import EOS_TOKEN, IM_END, ensure_tiny_tokenizer, tiny_llama_config

__all__ = [
    "COMPLETE_MARKERS",
    "TINY_MODEL_DIRNAME",
    "ensure_tiny_model",
    "pretrain_tiny",
    "windows",
    "unigram_loss",
]

TINY_MODEL_DIRNAME = "tiny-llama-base-v2"
"""v2: pretrained on the train topics only (``pydoc_topics_split``); a v1 base had seen the forgetting measure's text."""
REPORT_NAME = "pretrain_report.json"
COMPLETE_MARKERS = ("model.safetensors", "config.json", "tokenizer.json", REPORT_NAME)
"""Files whose presence marks a finished tiny-model folder (``sftray.models.cache.is_complete``)."""

log = logging.getLogger(__name__)


def pretrain_tiny(
    out_dir: Path,
    *,
    tokenizer_dir: Path,
    steps: int = 600,
    seq_len: int = 256,
    batch_size: int = 8,
    lr: float = 3e-3,
    warmup_steps: int = 30,
    seed: int = 0,
    log_every: int = 50,
) -> dict:
    """Train ``tiny_llama_config`` from scratch on pydoc prose; save model + tokenizer + report to ``out_dir``.

    Args (defaults: 600 x 8 x 256 = 1.2 M tokens, several passes over the training windows, small enough to run
    on a laptop's CPU):
      steps: optimizer steps (one batch each).
      seq_len: tokens per training window; the token stream is cut into consecutive windows of this length.
      batch_size: windows per step (tokens per step = batch_size * seq_len).
      lr: peak AdamW learning rate, reached after ``warmup_steps`` linear steps, then cosine decay to 0.
      seed: seeds initialisation and window order.
      log_every: steps between log lines (and the span of the reported train loss).

    Returns ``{"steps", "train_loss", "heldout_loss", "unigram_loss", "seconds", "tokens_seen"}``: losses are
    mean cross-entropy per predicted token in nats; train_loss averages the last ``log_every`` steps; the
    unigram baseline scores the same held-out targets with add-one-smoothed token frequencies of the training
    windows. Nothing is asserted: callers judge the numbers.
    """
    if steps < 1 or seq_len < 2 or batch_size < 1 or log_every < 1:
        raise ValueError(
            f"pretrain_tiny: steps={steps}, batch_size={batch_size}, log_every={log_every} must be >= 1 "
            f"and seq_len={seq_len} >= 2"
        )
    started = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    # Trained on the train topics, judged on the held-out topics: the very text the mix measures forgetting on
    # (``builtin:pydoc_topics_heldout``), so the report also shows the base has never seen it.
    train_text, heldout_text = pydoc_topics_split()
    train_windows = windows(_corpus_ids(tokenizer, train_text, eos_id=eos_id), seq_len=seq_len)
    heldout_windows = windows(_corpus_ids(tokenizer, heldout_text, eos_id=eos_id), seq_len=seq_len)
    vocab_size = len(tokenizer)

    config = tiny_llama_config(vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id)
    model = transformers.LlamaForCausalLM(config).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps
    )
    log.info(
        "pretraining tiny Llama (%.2f M params) on %d training windows of %d tokens (%d held out): "
        "%d steps x %d windows",
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(train_windows),
        seq_len,
        len(heldout_windows),
        steps,
        batch_size,
    )

    order = _window_order(len(train_windows), steps=steps, batch_size=batch_size, seed=seed)
    batches = (train_windows[order[(step - 1) * batch_size : step * batch_size]] for step in range(1, steps + 1))
    train_loss = _train(model, optimizer, scheduler, batches, steps=steps, log_every=log_every)

    heldout_loss = _heldout_loss(model, heldout_windows, batch_size=batch_size)
    unigram = unigram_loss(train_windows, heldout_windows, vocab_size=vocab_size)
    report = {
        "steps": steps,
        "train_loss": train_loss,
        "heldout_loss": heldout_loss,
        "unigram_loss": unigram,
        "seconds": round(time.perf_counter() - started, 1),
        "tokens_seen": steps * batch_size * seq_len,
    }
    log.info("held-out loss %.4f vs unigram %.4f (nats/token)", heldout_loss, unigram)

    _save(model, tokenizer, Path(out_dir), report=report, end_ids=[im_end_id, eos_id], pad_id=eos_id)
    return report


def _train(
    model: Any, optimizer: Any, scheduler: Any, batches: Iterable[torch.Tensor], *, steps: int, log_every: int
) -> float:
    """One optimizer step per batch (a progress bar, a log line every ``log_every`` steps); returns the mean train
    loss of the last ``log_every`` steps."""
    model.train()
    recent: list[float] = []
    running = None
    with logging_redirect_tqdm(), tqdm(total=steps, desc="pretrain tiny-llama", unit="step") as bar:
        for step, batch in enumerate(batches, start=1):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            value = loss.item()
            recent = (recent + [value])[-log_every:]
            running = value if running is None else 0.9 * running + 0.1 * value  # smoothed for the bar only
            bar.set_postfix(loss=f"{running:.3f}")
            bar.update()
            if step % log_every == 0 or step == steps:
                log.info(
                    "step %d/%d  train/loss %.4f  lr %.2e",
                    step,
                    steps,
                    sum(recent) / len(recent),
                    scheduler.get_last_lr()[0],
                )
    return sum(recent) / len(recent)


def _save(model: Any, tokenizer: Any, out_dir: Path, *, report: dict, end_ids: list[int], pad_id: int) -> None:
    """The model, its tokenizer and the pretraining report in ``out_dir``; generation stops at any of ``end_ids``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Chat generation stops at the end of an assistant turn, or at the end of a document.
    model.generation_config.eos_token_id = end_ids
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def _corpus_ids(tokenizer, text: str, *, eos_id: int) -> list[int]:
    """``text`` as one document closed by eos (as the mix's windower tokenizes pretraining text)."""
    # The stream is far longer than model_max_length; it is windowed below, so the length warning is noise.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return ids + [eos_id]


def windows(ids: list[int], *, seq_len: int) -> torch.Tensor:
    """Consecutive windows of ``seq_len`` tokens; the trailing partial window is dropped so batches stay rectangular."""
    num_windows = len(ids) // seq_len
    if num_windows < 1:
        raise ValueError(f"pretrain corpus has {len(ids)} tokens: too few for one window of seq_len={seq_len}")
    return torch.tensor(ids[: num_windows * seq_len], dtype=torch.long).view(num_windows, seq_len)


def _window_order(num_windows: int, *, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Training window indices for every step: seeded epochs, each a fresh permutation of all windows."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    epochs = [torch.randperm(num_windows, generator=generator) for _ in range(math.ceil(needed / num_windows))]
    return torch.cat(epochs)[:needed]


@torch.no_grad()
def _heldout_loss(model: torch.nn.Module, heldout: torch.Tensor, *, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of the ``heldout`` windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(heldout), batch_size):
        batch = heldout[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return total / count


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, *, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of add-one-smoothed training token frequencies on the held-out targets.

    Scores the same tokens as ``_heldout_loss`` (every window position but the first), so the two compare.
    """
    counts = Counter(train.reshape(-1).tolist())
    total = train.numel() + vocab_size  # add-one: every vocab entry gets one pseudo-count
    targets = heldout[:, 1:].reshape(-1).tolist()
    return -sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets)


def ensure_tiny_model(cache_dir: Path, **pretrain_kwargs) -> Path:
    """Return ``cache_dir / TINY_MODEL_DIRNAME`` holding the pretrained tiny Llama, pretraining it once if missing.

    ``pretrain_kwargs`` go to ``pretrain_tiny`` and only matter when the model is built; a complete folder is
    reused whatever they say (delete it to rebuild).
    """
    cache_dir = Path(cache_dir)

    def build(tmp: Path) -> None:
        pretrain_tiny(tmp, tokenizer_dir=ensure_tiny_tokenizer(cache_dir), **pretrain_kwargs)

    return build_once(cache_dir / TINY_MODEL_DIRNAME, markers=COMPLETE_MARKERS, build=build)

"""Resuming from an epoch checkpoint: whether one can continue a configuration, the earlier epochs that stay
candidates for selection, and the newest complete checkpoint of a run (what a failed run's resume hint names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftray.config import Config
from sftray.eval.metrics import TRAIN_LOSS
from sftray.layout import EPOCH_GLOB, epoch_dir_name
from sftray.train.checkpoint import STATE_FILE as CHECKPOINT_STATE
from sftray.train.checkpoint import load_state


def check_resumable(checkpoint: Path, *, cfg: Config, steps_per_epoch: int) -> None:
    """Fails before any worker starts when ``train.resume_from`` cannot continue this run's configuration."""
    what = f"train.resume_from={checkpoint}"
    if not (checkpoint / CHECKPOINT_STATE).is_file() or not (checkpoint / "model").is_dir():
        raise ValueError(f"{what} is not a complete sftray checkpoint (it needs {CHECKPOINT_STATE} and model/)")
    lora = (checkpoint / "model" / "adapter_config.json").is_file()
    if lora != (cfg.train.method == "lora"):
        raise ValueError(f"{what} holds a {'LoRA' if lora else 'full'} model but train.method={cfg.train.method}")
    state = load_state(checkpoint)
    if state["epoch"] >= cfg.train.epochs:
        raise ValueError(
            f"{what} ends epoch {state['epoch']} and train.epochs={cfg.train.epochs}: nothing left to train "
            "(raise train.epochs)"
        )
    if state["step"] != state["epoch"] * steps_per_epoch:
        raise ValueError(
            f"{what} took {state['step']} steps in {state['epoch']} epoch(s), but this configuration takes "
            f"{steps_per_epoch} per epoch: resume with the data and batch settings of the run that wrote it"
        )


def prior_checkpoints(checkpoint: Path) -> list[tuple[str, dict[str, Any]]]:
    """The epoch checkpoints up to and including ``checkpoint`` in its run folder, with their epoch-end metrics."""
    history = load_state(checkpoint)["history"]
    out = []
    for metrics in history:
        folder = checkpoint.parent / epoch_dir_name(metrics["epoch"])
        if metrics["epoch"] > 0 and TRAIN_LOSS in metrics and (folder / CHECKPOINT_STATE).is_file():
            out.append((str(folder), metrics))
    return out


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete epoch checkpoint below ``run_dir`` (a run folder or a folder of runs), if any."""
    done = [
        p.parent for p in Path(run_dir).glob(f"**/{EPOCH_GLOB}/{CHECKPOINT_STATE}") if (p.parent / "model").is_dir()
    ]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None

"""Checkpoints: an HF-loadable model (full weights, or the peft adapter) plus the exact training state.

Layout of one checkpoint folder:
  model/            save_pretrained output + tokenizer: the full model, or the adapter (adapter_model.safetensors,
                    adapter_config.json) with sftray_adapter.json naming any tokens added to the base's vocabulary
  merged/           (LoRA with train.export_merged) the base with the adapter merged in, plain transformers
  train_state.pt    optimizer (full, by parameter name), scheduler, epoch, step, base losses, metric history
  probes.json       the generation-probe table of this epoch's eval, and probes_base.json of the base model

Sharded (FSDP2) state is gathered with torch.distributed.checkpoint's state-dict API on every rank (a collective);
rank 0 writes. Loading reads the full state on every rank before and after wrapping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from sftray.core.parallel import unwrap
from sftray.models.loading import load_model
from sftray.models.lora import write_adapter_note

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
STATE_FILE = "train_state.pt"
"""The training state's file in a checkpoint folder: its presence marks a complete checkpoint."""


def save(
    model: Any,
    optimizer: Any,
    *,
    directory: Path,
    tokenizer: Any,
    state: dict[str, Any],
    rank: int,
    tables: dict[str, list[dict]],
    merged_from: str | None = None,
) -> None:
    """Gathers model and optimizer state (all ranks must call) and writes the checkpoint on rank 0."""
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if rank != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    hf = unwrap(model)
    hf.save_pretrained(directory / "model", state_dict=model_sd, safe_serialization=True)
    tokenizer.save_pretrained(directory / "model")
    if hasattr(hf, "peft_config"):
        write_adapter_note(directory / "model", model=hf, tokenizer=tokenizer)
    for name, table in tables.items():
        (directory / f"{name}.json").write_text(json.dumps(table, indent=1))
    torch.save({**state, "optimizer": optim_sd}, directory / STATE_FILE)
    if merged_from is not None:
        export_merged(
            base_path=merged_from, adapter_dir=directory / "model", out_dir=directory / "merged", tokenizer=tokenizer
        )


PROBES_TABLE = "probes"
"""The name of the epoch's probe table among ``save``'s tables (``probes.json``; ``probes_base`` the base's)."""


def read_table(checkpoint_dir: str | Path, name: str = PROBES_TABLE) -> list[dict] | None:
    """A table ``save`` wrote into a checkpoint folder (default: its epoch's probe table), None if it has none."""
    path = Path(checkpoint_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def export_merged(*, base_path: str, adapter_dir: Path, out_dir: Path, tokenizer: Any) -> None:
    """Base model + adapter -> one plain transformers model (no peft needed to load it)."""
    from peft import PeftModel

    base, _ = load_model(base_path, tokenizer=tokenizer)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_state(directory: Path) -> dict[str, Any]:
    """The training state of a checkpoint (every rank reads it)."""
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)


def restore_optimizer(model: Any, optimizer: Any, optim_sd: dict[str, Any]) -> None:
    """Loads a full optimizer state into a (possibly sharded) optimizer; each rank keeps its shard."""
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=optim_sd, options=StateDictOptions(full_state_dict=True)
    )

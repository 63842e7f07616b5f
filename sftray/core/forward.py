"""The forward pass of a collated batch, as training and evaluation both run it: logits at every position, or the
LM head applied only at the positions the loss reads."""

from __future__ import annotations

from typing import Any

import torch

from sftray.core.parallel import unwrap


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a collated batch on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def forward_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a collated batch; packed batches have no attention_mask (attention follows position_ids)."""
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
    ).logits


def forward_kept_logits(model: Any, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Logits ``[kept, vocab]`` at the positions where ``keep`` ([batch, seq] bool) is True, in row-major order.

    The LM head (the module ``get_output_embeddings()`` returns) sees only the kept hidden states: a pre-hook on it
    replaces its ``[batch, seq, hidden]`` input by ``[1, kept, hidden]`` for this one forward. The whole model still
    runs through its outermost ``forward``, so DDP's gradient sync, FSDP2's gathers of the root's parameters
    (embeddings, head, final norm) and peft's adapters (a ``modules_to_save`` head included) work as for the full
    forward, and packed rows keep their position_ids-derived attention. ``[1, kept, ...]`` is the shape a
    ``logits_to_keep`` index tensor gives the head, so what a model applies after its head (Gemma's
    ``final_logit_softcapping``, a logit scale) runs on the kept positions unchanged. A model whose head is not
    such a module, or that calls it on another shape, gets its full logits computed and then selected.

    Why not the model's ``logits_to_keep=<bool [batch, seq]>``: transformers accepts a boolean mask there only in
    recent 5.x releases (sftray supports 5.0 on) and only in models that slice through ``slice_logits_to_keep``.
    """
    head = getattr(unwrap(model), "get_output_embeddings", lambda: None)()
    selected: list[bool] = []

    def select(module: torch.nn.Module, args: tuple) -> tuple | None:
        if selected or not args or tuple(args[0].shape[:-1]) != tuple(keep.shape):
            return None  # a call this function did not plan for: leave it alone
        selected.append(True)
        return (args[0][keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select) if isinstance(head, torch.nn.Module) else None
    try:
        logits = forward_logits(model, batch)
    finally:
        if handle is not None:
            handle.remove()
    return logits[0] if selected else logits[keep]

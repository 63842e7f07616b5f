"""LoRA adapters via peft: config -> PeftModel, with rows of newly added tokens trainable too."""

from __future__ import annotations

from typing import Any

from sftray.config import LoraConfig


def apply_lora(model: Any, *, cfg: LoraConfig, new_token_ids: list[int]) -> Any:
    """Wraps ``model`` with adapters; base weights frozen except ``modules_to_save`` and new token rows."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = cfg.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        # Tokens the template needed but the base lacked have no trained embedding: train just those rows.
        trainable_token_indices=list(new_token_ids) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)

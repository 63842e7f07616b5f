"""Loading base tokenizers (and, later, models): hub ids, local folders, or the builtin tiny Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftray.config import ModelConfig

BUILTIN_TINY = "builtin:tiny-llama"


def resolve_model_path(cfg: ModelConfig, *, cache_dir: Path) -> str:
    """A from_pretrained-able path: the builtin tiny Llama is built into ``cache_dir`` on first use."""
    if cfg.name_or_path == BUILTIN_TINY:
        from sftray.models.tiny import ensure_tiny_tokenizer

        return str(ensure_tiny_tokenizer(Path(cache_dir)))
    if cfg.name_or_path.startswith("builtin:"):
        raise ValueError(f"model.name_or_path={cfg.name_or_path!r}: the only builtin model is {BUILTIN_TINY}")
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig, *, cache_dir: Path) -> Any:
    """``AutoTokenizer.from_pretrained`` with the config's chat-template override applied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg, cache_dir=cache_dir), trust_remote_code=cfg.trust_remote_code
    )
    if cfg.chat_template:
        template = cfg.chat_template
        if template.endswith(".jinja") or Path(template).expanduser().is_file():
            template = Path(template).expanduser().read_text()
        tokenizer.chat_template = template
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{cfg.name_or_path} has no chat template: set model.chat_template to a Jinja string or .jinja file"
        )
    if tokenizer.pad_token is None:
        # Padding needs an id; labels are masked by position, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

"""Loading base models and their tokenizers: hub ids, local folders, or the builtin tiny Llama."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from sftray.config import ModelConfig
from sftray.data.chat import generation_prompt_drift, missing_token_message, undefined_template_tokens
from sftray.models.pretrain import ensure_tiny_model
from sftray.models.tiny import ensure_tiny_tokenizer

log = logging.getLogger(__name__)

BUILTIN_TINY = "builtin:tiny-llama"


def resolve_tokenizer_path(cfg: ModelConfig, *, cache_dir: Path) -> str:
    """A from_pretrained-able path to the base model's TOKENIZER: the builtin tiny Llama's tokenizer is built into
    ``cache_dir`` on first use (seconds; no pretraining)."""
    if cfg.name_or_path == BUILTIN_TINY:
        return str(ensure_tiny_tokenizer(Path(cache_dir)))
    if cfg.name_or_path.startswith("builtin:"):
        raise ValueError(f"model.name_or_path={cfg.name_or_path!r}: the only builtin model is {BUILTIN_TINY}")
    return cfg.name_or_path


def load_tokenizer(cfg: ModelConfig, *, cache_dir: Path) -> Any:
    """``AutoTokenizer.from_pretrained`` with the config's chat-template override applied."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_tokenizer_path(cfg, cache_dir=cache_dir), trust_remote_code=cfg.trust_remote_code
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
    if cfg.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.special_tokens))  # adds a text missing from the vocabulary
    check_chat_template(tokenizer, cfg)
    add_template_tokens(tokenizer)
    if tokenizer.pad_token is None:
        # Padding needs an id; labels are masked by position, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_chat_template(tokenizer: Any, cfg: ModelConfig) -> None:
    """Checks, before any data is read, that the chat template finds every special token it uses.

    A template that uses one the tokenizer lacks fails here when rendering needs it (``bos_token + content``);
    when it only prints it (``{{ bos_token }}``) it renders as nothing, exactly as transformers renders it at
    inference, with a warning naming the knob (``model.special_tokens``). A generation prompt that differs from
    the full render in whitespace only (a .jinja file kept one expression a line) is a warning too.
    """
    what = "model.chat_template" if cfg.chat_template else f"the chat template of {cfg.name_or_path}"
    if drift := generation_prompt_drift(tokenizer):
        log.warning(
            "%s: the generation prompt ends %r where the full conversation has %r (whitespace only, e.g. the "
            "newline after each {{ ... }} line of a template file): loss masks are derived regardless, but "
            "generation prompts end differently from the trained text; use {{- ... }} and {%%- ... %%} or "
            "join the file's lines to match",
            what,
            *drift,
        )
    for name, needed in undefined_template_tokens(tokenizer).items():
        message = f"{what}: {missing_token_message(name, tokenizer_name=cfg.name_or_path, needed=needed)}"
        if needed:
            raise ValueError(message)
        log.warning("%s", message)


_TEMPLATE_TOKEN = re.compile(r"<\|[A-Za-z0-9_.:-]+\|>|<(?:start|end)_of_turn>")
"""Control-token spellings in chat templates (``<|im_start|>``, ``<|eot_id|>``, ``<start_of_turn>``...)."""


def add_template_tokens(tokenizer: Any) -> list[str]:
    """Adds the control tokens a chat template writes but the tokenizer lacks (as atomic special tokens)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    missing = sorted({t for t in _TEMPLATE_TOKEN.findall(template) if t not in vocab})
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def load_model(path: str, *, tokenizer: Any, trust_remote_code: bool = False) -> tuple[Any, list[int]]:
    """``AutoModelForCausalLM.from_pretrained`` (safetensors only, float32 master weights) sized to ``tokenizer``.

    Rows added for new tokens start at the mean of the existing embeddings (a random row would give the new
    token a huge, arbitrary logit). Returns the model and the ids of the added rows (LoRA trains them too).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    old = model.get_input_embeddings().weight.shape[0]
    new_ids = list(range(old, len(tokenizer)))
    if new_ids:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
                emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, new_ids


def resolve_base_model_path(cfg: ModelConfig, *, cache_dir: Path) -> str:
    """A from_pretrained-able path to the base MODEL (weights + tokenizer).

    ``builtin:tiny-llama`` is pretrained into ``cache_dir`` on first use (minutes on CPU, then cached); anything
    else is passed through as a hub id or folder. ``resolve_tokenizer_path`` stays tokenizer-only, so data prep never
    triggers pretraining.
    """
    if cfg.name_or_path == BUILTIN_TINY:
        return str(ensure_tiny_model(Path(cache_dir)))
    return resolve_tokenizer_path(cfg, cache_dir=cache_dir)

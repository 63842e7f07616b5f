"""Loading base models and their tokenizers: hub ids, local folders, or the builtin tiny Llama."""

from __future__ import annotations

import json
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
    """``AutoTokenizer.from_pretrained`` with the config's chat-template override applied, and the base's vocabulary
    unchanged unless the template writes control tokens the tokenizer lacks (``add_template_tokens``)."""
    path = resolve_tokenizer_path(cfg, cache_dir=cache_dir)
    template = cfg.chat_template
    if template and (template.endswith(".jinja") or Path(template).expanduser().is_file()):
        template = Path(template).expanduser().read_text()
    tokenizer = _load_without_invented_tokens(path, trust_remote_code=cfg.trust_remote_code, template=template)
    if template:
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


_DEFAULTED_SPECIALS = ("pad_token", "unk_token", "bos_token", "sep_token", "cls_token", "mask_token")
"""Special-token roles a tokenizer class may fill with its own default (Qwen2Tokenizer: pad and unk
``<|endoftext|>``; GPT2Tokenizer: unk and bos) when the files name none. eos is the files' own, always kept."""


def _load_without_invented_tokens(path: str, *, trust_remote_code: bool, template: str | None) -> Any:
    """``AutoTokenizer.from_pretrained`` minus special tokens that only its class's defaults bring in.

    transformers 5 adds such a default as a NEW token when the files' vocabulary lacks it (a Qwen2Tokenizer without
    ``<|endoftext|>`` loads with one token more than its model has rows). Training on that vocabulary would grow the
    embeddings, and an adapter saved from it would not load on its own unmodified base. A role whose token is not
    in the vocabulary loaded without defaults is therefore left unset, unless the chat template uses it (by role
    name or spelling); pad then reuses eos.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        bare = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code, **dict.fromkeys(_DEFAULTED_SPECIALS)
        )
    except Exception:  # a class that cannot load without one of them (custom code): it invents nothing we can see
        return tokenizer
    if len(bare) == len(tokenizer):
        return tokenizer
    vocab = bare.get_vocab()
    text = template or (tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else "")
    invented = [
        role
        for role in _DEFAULTED_SPECIALS
        if (token := getattr(tokenizer, role, None)) and token not in vocab and role not in text and token not in text
    ]
    if not invented:
        return tokenizer
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **dict.fromkeys(invented))


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

    Tokens of ``tokenizer`` that the model at ``path`` has no trained row for are new: ids beyond its embedding, and
    tokens its own tokenizer lacks (the template tokens ``add_template_tokens`` added; on an embedding padded beyond
    its vocabulary, as Qwen's, they fall on spare rows the model already has). Their rows start at the mean of the
    known tokens' rows (a random row would give the new token a huge, arbitrary logit). Returns the model and the
    new ids (LoRA trains their rows too). The embedding grows only when ``tokenizer`` has more tokens than rows.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    rows = model.get_input_embeddings().weight.shape[0]
    unknown = _ids_unknown_to(path, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    new_ids = sorted({*range(rows, len(tokenizer)), *unknown})
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if new_ids:
        known = torch.ones(min(rows, len(tokenizer)), dtype=torch.bool)
        known[[i for i in new_ids if i < len(known)]] = False
        with torch.no_grad():
            for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
                emb.weight[new_ids] = emb.weight[: len(known)][known].mean(dim=0, keepdim=True)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, new_ids


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _ids_unknown_to(path: str, *, tokenizer: Any, trust_remote_code: bool) -> list[int]:
    """Ids of ``tokenizer``'s tokens that the tokenizer saved with the model at ``path`` lacks ([] when the folder
    holds no tokenizer: then only ids beyond the embedding count as new)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return []
    own = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code).get_vocab()
    return sorted(i for token, i in tokenizer.get_vocab().items() if token not in own)


def load_trained(path: str | Path) -> tuple[Any, Any]:
    """A trained output as plain transformers/peft objects: ``(model, tokenizer)``.

    ``path`` is a checkpoint folder (its ``model/`` is loaded), an adapter folder, or a full or merged model folder.
    An adapter goes onto the base named in its ``adapter_config.json``, whose embeddings first grow to the saved
    tokenizer when training added tokens the base lacks (see ``sftray_adapter.json`` beside it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        folder = folder / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer
    from peft import PeftModel

    base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(model, str(folder)).eval(), tokenizer


def resolve_base_model_path(cfg: ModelConfig, *, cache_dir: Path) -> str:
    """A from_pretrained-able path to the base MODEL (weights + tokenizer).

    ``builtin:tiny-llama`` is pretrained into ``cache_dir`` on first use (minutes on CPU, then cached); anything
    else is passed through as a hub id or folder. ``resolve_tokenizer_path`` stays tokenizer-only, so data prep never
    triggers pretraining.
    """
    if cfg.name_or_path == BUILTIN_TINY:
        return str(ensure_tiny_model(Path(cache_dir)))
    return resolve_tokenizer_path(cfg, cache_dir=cache_dir)

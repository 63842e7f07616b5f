"""A transformers-free view of a fast tokenizer: exactly the calls chat encoding and windowing make, fast to load.

Encoding runs in Ray worker processes. Loading a tokenizer through transformers there imports torch in every
process and renders every chat through ``apply_chat_template``, whose message normalisation costs more than the Jinja
render itself. The driver, which holds the real tokenizer, captures what encoding needs in
a ``TokenizerSpec`` (the backend's JSON, the chat template, the special tokens); a worker builds a
``TokenizerView`` from it with the ``tokenizers`` library and transformers' own compiled Jinja environment (the
same sandbox, filters and globals ``apply_chat_template`` uses), without importing torch. ``tests/data/test_chat_families``
checks that ``encode_chat`` gives identical ids, labels and errors through a view and through the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    """What a ``TokenizerView`` needs, captured from a transformers fast tokenizer (picklable, a few MB at most)."""

    backend_json: str
    """The Rust tokenizer serialised (``tokenizer.backend_tokenizer.to_str()``): vocabulary, merges, added tokens."""
    chat_template: str | None
    """The template ``apply_chat_template`` uses without arguments (named templates resolved)."""
    template_kwargs: dict[str, str]
    """Variables every render gets: the tokenizer's ``special_tokens_map`` (bos_token, eos_token, ...)."""
    special_tokens: tuple[str, ...]
    """Every special and added token string (``chat._special_tokens`` reads them)."""
    bos_token: str | None
    eos_token_id: int | None


def spec_of(tokenizer: Any) -> TokenizerSpec:
    """The spec of a transformers fast tokenizer (``ValueError`` for a slow one: offsets need the Rust backend)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; chat masks need its offsets")
    template = None
    if getattr(tokenizer, "chat_template", None):
        template = tokenizer.get_chat_template()
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
    return TokenizerSpec(
        backend_json=tokenizer.backend_tokenizer.to_str(),
        chat_template=template,
        template_kwargs={k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        special_tokens=tuple(sorted(t for t in specials if t)),
        bos_token=tokenizer.bos_token,
        eos_token_id=tokenizer.eos_token_id,
    )


class TokenizerView:
    """The fast-tokenizer calls of ``encode_chat`` and the text windower, backed by ``tokenizers`` directly."""

    is_fast = True

    def __init__(self, spec: TokenizerSpec) -> None:
        from tokenizers import Tokenizer

        # transformers' compiled (cached) Jinja environment: the private name is the one place that builds the
        # sandbox apply_chat_template renders in; importing this module does not import torch.
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self._tok = Tokenizer.from_str(spec.backend_json)
        self._tok.no_truncation()  # transformers sets these per call; the view never truncates or pads
        self._tok.no_padding()
        self._template = _compile_jinja_template(spec.chat_template) if spec.chat_template else None
        self._kwargs = dict(spec.template_kwargs)
        self.chat_template = spec.chat_template
        self.all_special_tokens = list(spec.special_tokens)
        self.added_tokens_decoder: dict[int, str] = {}  # already in all_special_tokens
        self.bos_token = spec.bos_token
        self.eos_token_id = spec.eos_token_id

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(
        self, messages: list[dict], *, tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        """The rendered text of plain ``{"role", "content"}`` messages, as ``apply_chat_template`` renders it."""
        if tokenize:
            raise ValueError("TokenizerView renders text only (tokenize=False)")
        if self._template is None:
            raise ValueError("the tokenizer has no chat_template")
        return self._template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self._kwargs
        )

    def __call__(
        self, text: str, *, add_special_tokens: bool = False, return_offsets_mapping: bool = False, verbose: bool = True
    ) -> dict[str, list]:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, list] = {"input_ids": enc.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def decode(
        self, ids: list[int], *, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("TokenizerView decodes without clean-up only (clean_up_tokenization_spaces=False)")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int | None]:
        return [self._tok.token_to_id(t) for t in tokens]

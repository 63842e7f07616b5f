"""Offline tiny assets: a ChatML byte-level BPE tokenizer trained locally and a tiny Llama config.

Nothing here touches a model hub: the tokenizer is trained in a few seconds on
text shipped with Python (pydoc topics) plus synthetic demo conversations, so
SFT experiments and tests run anywhere on CPU.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sftray.data.builtin import generate_demo_conversations, pydoc_topics_text
from sftray.models.cache import build_once

__all__ = [
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "SPECIAL_TOKENS",
    "TINY_TOKENIZER_DIRNAME",
    "build_tiny_tokenizer",
    "ensure_tiny_tokenizer",
    "tiny_llama_config",
]

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes their ids: 0, 1, 2 (the trainer adds special tokens first).
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START, IM_END)
TINY_TOKENIZER_DIRNAME = "tiny-llama"

# ChatML as in Qwen2, minus the default system prompt and tool handling.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unsupported chat role: ' + message['role'] + "
    "' (expected system, user or assistant)') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_MODEL_MAX_LENGTH = 1024  # matches tiny_llama_config's max_position_embeddings
# Enough demo conversations that every task word / number form is seen many times.
_TOKENIZER_DEMO_CONVERSATIONS = 3000
_TOKENIZER_DEMO_SEED = 12345  # independent of the train-set seed; only coverage matters
_COMPLETE_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def _training_texts() -> list[str]:
    """Corpus for the BPE: pydoc prose split by topic plus role-tagged demo conversations."""
    texts = pydoc_topics_text().split("\n\n")
    for conv in generate_demo_conversations(_TOKENIZER_DEMO_CONVERSATIONS, seed=_TOKENIZER_DEMO_SEED):
        # "role\ncontent\n" mirrors what the ChatML template leaves between special tokens.
        texts.append("".join(f"{m['role']}\n{m['content']}\n" for m in conv["messages"]))
    return texts


def build_tiny_tokenizer(out_dir: Path, *, vocab_size: int = 4096) -> transformers.PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE with ChatML specials, save it to `out_dir`, return it.

    eos == pad == `<|endoftext|>` on purpose (no bos); loss masking must therefore
    rely on attention/label masks, not on pad ids. Offsets are untrimmed so they
    tile the input exactly (useful for char-span -> token masks).
    """
    tok = Tokenizer(models.BPE())
    # Single digits (as Qwen2 and Llama-3 split numbers): a tiny model learns arithmetic digit by digit, and
    # "42" and " 42" share their digit tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: keep the leading-space byte inside each token's offsets (as Qwen2 does).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,  # a merge seen once is noise for a corpus this small
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)

    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=_MODEL_MAX_LENGTH,
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,  # byte-level decoding is already exact
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def ensure_tiny_tokenizer(cache_dir: Path) -> Path:
    """Return `cache_dir/"tiny-llama"` holding the tiny tokenizer, building it once if missing."""
    return build_once(Path(cache_dir) / TINY_TOKENIZER_DIRNAME, markers=_COMPLETE_MARKERS, build=build_tiny_tokenizer)


def tiny_llama_config(*, vocab_size: int, **overrides) -> transformers.LlamaConfig:
    """Return a ~1 M-parameter (plus embeddings) Llama config that trains in seconds on CPU.

    bos/eos/pad token ids default to None (Llama's 1/2 would point at ChatML
    specials here); pass them via `overrides`, which also replace any size below.
    """
    params: dict = {
        "vocab_size": vocab_size,
        "hidden_size": 128,  # smallest width that still learns the demo tasks; head_dim = 32
        "intermediate_size": 352,  # ~8/3 * 128 (SwiGLU ratio) rounded up to a multiple of 32
        "num_hidden_layers": 4,  # enough depth for multi-step tasks (sort, reverse)
        "num_attention_heads": 4,  # 128 / 4 = 32-dim heads
        "num_key_value_heads": 2,  # GQA (2 query heads per kv head) so the GQA path is exercised
        "max_position_embeddings": 1024,  # = tokenizer model_max_length
        "tie_word_embeddings": True,  # embeddings dominate params at this size; tying halves them
        "rope_parameters": None,  # default RoPE (theta 10000, no scaling)
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    params.update(overrides)
    return transformers.LlamaConfig(**params)

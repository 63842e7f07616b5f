"""A base whose tokenizer has no pad token and whose tokenizer class invents one (as Qwen2's does in transformers 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftray.models.tiny import CHATML_TEMPLATE, IM_END, IM_START

INVENTED = "<|endoftext|>"
"""Qwen2Tokenizer's default pad and unk: absent from this base's vocabulary, so loading would add it."""


@pytest.fixture(scope="session")
def nopad_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer tiny Llama whose byte-level BPE tokenizer (ChatML, eos ``<|im_end|>``, no pad, no
    ``<|endoftext|>``) is declared a ``Qwen2Tokenizer``: ``AutoTokenizer`` then adds ``<|endoftext|>`` as pad and unk
    (vocabulary +1) unless the loader stops it. The model's embedding has exactly the file's vocabulary."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from sftray.models.tiny import tiny_llama_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    text = [f"user\nAdd {i} and {i + 3}.\nassistant\n{2 * i + 3}\nNow double it.\n" for i in range(200)]
    trainer = trainers.BpeTrainer(
        vocab_size=400,  # tiny: the base only has to encode the tests' chats
        special_tokens=[IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer=trainer)
    base = tmp_path_factory.mktemp("nopad-base")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, chat_template=CHATML_TEMPLATE)
    hf.save_pretrained(base)
    config_file = base / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "Qwen2Tokenizer"}))
    assert INVENTED not in hf.get_vocab() and hf.pad_token is None
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(hf), eos_token_id=hf.eos_token_id, num_hidden_layers=2)
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    return base


@pytest.fixture(scope="session")
def padded_base(nopad_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``nopad_base``'s tokenizer on a model with 8 embedding rows more than tokens (as Qwen pads its embedding to a
    multiple): tokens added to the tokenizer get rows the model already has."""
    import shutil

    import torch
    import transformers

    from sftray.models.tiny import tiny_llama_config

    base = tmp_path_factory.mktemp("padded-base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (nopad_base / name).is_file():
            shutil.copy(nopad_base / name, base / name)
    config = json.loads((nopad_base / "config.json").read_text())
    torch.manual_seed(0)
    model_config = tiny_llama_config(
        vocab_size=config["vocab_size"] + 8, eos_token_id=config["eos_token_id"], num_hidden_layers=2
    )
    transformers.LlamaForCausalLM(model_config).save_pretrained(base)
    return base

"""``encode_chat`` against six real chat-template families, checked by an independent oracle.

The templates below are the real ones (text as published in each model's ``tokenizer_config.json``):
Qwen2-Instruct (ChatML with a default system prompt), Meta-Llama-3-Instruct, Mistral-7B-Instruct (v0.1-v0.3
current template: system folded into the first user turn, strict alternation), Gemma / Gemma-2-it (system
rejected, ``assistant`` renamed ``model``, ``| trim``), Phi-3-mini-4k-instruct and zephyr-7b-beta.

They all run on ONE tiny byte-level BPE tokenizer trained here in about a second (offline), which carries
every family's special tokens as atomic added tokens; each family gets a copy with its real chat_template,
bos, eos and pad (Mistral, Zephyr and Phi-3 have ``pad == eos``).

The oracle never looks at the implementation: for each family a hand-written formatter produces the same text
as the template (asserted) as a list of pieces, knowing which pieces are assistant content and which is the
end-of-turn marker. A token must be trained iff its characters overlap a turn's (stripped) content or it is
that turn's end-of-turn token. Tokens that only touch a turn's leading/trailing *whitespace* (a template that
does not trim puts it in the text, and byte-level BPE may glue it to the template's own newline/space) may go
either way, but the trained tokens of a turn must be one contiguous run ending at its end-of-turn token.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sftray.data.chat import MaskError, MessageError, encode_chat

IGNORE = -100
EXAMPLE_ID = "row-7"

SPECIAL_TOKENS = [
    "<|endoftext|>", "<pad>",
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<s>", "</s>", "[INST]", "[/INST]",
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
]  # fmt: skip

# --------------------------------------------------------------------------------------------------------------
# The real templates. Python "\n" inside a Jinja string literal is what the JSON files hold ("\n" escape in
# JSON = a newline character); "\\n" is a backslash-n escape inside the Jinja literal (Mistral's JSON has "\\n").
# --------------------------------------------------------------------------------------------------------------

# Qwen/Qwen2-7B-Instruct
CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.2 / v0.3 (current template)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
MISTRAL_ALTERNATE_MSG = (
    "After the optional system message, conversation roles must alternate user/assistant/user/assistant/..."
)

# google/gemma-2b-it, google/gemma-2-9b-it
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# microsoft/Phi-3-mini-4k-instruct
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta (multi-line; transformers renders with trim_blocks/lstrip_blocks)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


# --------------------------------------------------------------------------------------------------------------
# The oracle: hand formatters that know which pieces are assistant content and end-of-turn markers.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Turn:
    raw: tuple[int, int]  # content as rendered (after the template's own trim, if any)
    strip: tuple[int, int]  # the same without leading/trailing whitespace
    eot: tuple[int, int] = (0, 0)  # the end-of-turn marker
    content: str = ""


@dataclass
class Rendered:
    text: str = ""
    turns: list[Turn] = field(default_factory=list)

    def t(self, s: str) -> None:  # template / system / user text: never trained
        self.text += s

    def a(self, content: str) -> None:  # assistant content exactly as the template puts it in the text
        start = len(self.text)
        lead = len(content) - len(content.lstrip())
        self.turns.append(Turn((start, start + len(content)), (start + lead, start + lead + len(content.strip()))))
        self.turns[-1].content = content
        self.text += content

    def e(self, marker: str) -> None:  # end-of-turn marker of the assistant turn just added
        self.turns[-1].eot = (len(self.text), len(self.text) + len(marker))
        self.text += marker


def fmt_chatml(msgs: list[dict]) -> Rendered:
    r = Rendered()
    if msgs[0]["role"] != "system":
        r.t("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    for m in msgs:
        r.t(f"<|im_start|>{m['role']}\n")
        if m["role"] == "assistant":
            r.a(m["content"])
            r.e("<|im_end|>")
        else:
            r.t(m["content"] + "<|im_end|>")
        r.t("\n")
    return r


def fmt_llama3(msgs: list[dict]) -> Rendered:
    r = Rendered()
    r.t("<|begin_of_text|>")
    for m in msgs:
        r.t(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
        if m["role"] == "assistant":
            r.a(m["content"].strip())
            r.e("<|eot_id|>")
        else:
            r.t(m["content"].strip() + "<|eot_id|>")
    return r


def fmt_mistral(msgs: list[dict]) -> Rendered:
    r = Rendered()
    system = None
    if msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    r.t("<s>")
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            prefix = system + "\n\n" if (i == 0 and system is not None) else ""
            r.t(" [INST] " + prefix + m["content"] + " [/INST]")
        else:
            r.t(" ")
            r.a(m["content"])
            r.e("</s>")
    return r


def fmt_gemma(msgs: list[dict]) -> Rendered:
    r = Rendered()
    r.t("<bos>")
    for m in msgs:
        role = "model" if m["role"] == "assistant" else m["role"]
        r.t(f"<start_of_turn>{role}\n")
        if m["role"] == "assistant":
            r.a(m["content"].strip())
            r.e("<end_of_turn>")
        else:
            r.t(m["content"].strip() + "<end_of_turn>")
        r.t("\n")
    return r


def fmt_phi3(msgs: list[dict]) -> Rendered:
    r = Rendered()
    for m in msgs:
        r.t(f"<|{m['role']}|>\n")
        if m["role"] == "assistant":
            r.a(m["content"])
            r.e("<|end|>")
        else:
            r.t(m["content"] + "<|end|>")
        r.t("\n")
    r.t("<|endoftext|>")  # eos_token, emitted because add_generation_prompt is false
    return r


def fmt_zephyr(msgs: list[dict]) -> Rendered:
    r = Rendered()
    for m in msgs:
        r.t(f"<|{m['role']}|>\n")
        if m["role"] == "assistant":
            r.a(m["content"])
            r.e("</s>")
        else:
            r.t(m["content"] + "</s>")
        r.t("\n")
    return r


@dataclass(frozen=True)
class Family:
    template: str
    fmt: Callable[[list[dict]], Rendered]
    eot: str
    bos: str | None
    eos: str
    pad: str | None
    system: bool = True  # the template accepts a system message


FAMILIES: dict[str, Family] = {
    "qwen2_chatml": Family(CHATML_QWEN2, fmt_chatml, "<|im_end|>", None, "<|im_end|>", "<|endoftext|>"),
    "llama3": Family(LLAMA3, fmt_llama3, "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>", None),
    "mistral": Family(MISTRAL, fmt_mistral, "</s>", "<s>", "</s>", "</s>"),
    "gemma": Family(GEMMA, fmt_gemma, "<end_of_turn>", "<bos>", "<eos>", "<pad>", system=False),
    "phi3": Family(PHI3, fmt_phi3, "<|end|>", "<s>", "<|endoftext|>", "<|endoftext|>"),
    "zephyr": Family(ZEPHYR, fmt_zephyr, "</s>", "<s>", "</s>", "</s>"),
}


# --------------------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------------------


def _u(c: str) -> dict:
    return {"role": "user", "content": c}


def _a(c: str) -> dict:
    return {"role": "assistant", "content": c}


def _s(c: str) -> dict:
    return {"role": "system", "content": c}


SINGLE = [_u("What is the capital of France?"), _a("The capital of France is Paris.")]
MULTI = [
    _u("Name a colour."),
    _a("Blue is a colour."),
    _u("Name another one, and say why you like it."),
    _a("Green, because it is the colour of the forest in spring."),
    _u("Thanks! One more?"),
    _a("Red. That makes three colours."),
]
WHITESPACE = [
    _u("  Give me a list, please.\n"),
    _a("  Sure, here it is:\n\n- one\n- two  \n"),
    _u("\nAnd with tabs?\t"),
    _a("\n\tIndented line\n\tsecond line\t\n\n"),
    _u("Thanks."),
    _a("You are welcome.   "),
]
UNICODE = [
    _u("Ça va? Wie geht's dir — ünïcödé ✓"),
    _a("Très bien, merci! 日本語のテキスト 🚀 naïve café"),
    _u("Und jetzt? 🙂"),
    _a("Ещё одна строка — ελληνικά too.\nZweite Zeile: ß ẞ"),
]
# Assistant text that also occurs in user turns and in the templates' own role names.
ECHO = [_u("assistant"), _a("assistant"), _u("user"), _a("user"), _u("model"), _a("model")]

CONVERSATIONS: dict[str, list[dict]] = {
    "single": SINGLE,
    "multi": MULTI,
    "whitespace": WHITESPACE,
    "unicode": UNICODE,
    "echo": ECHO,
    "system_single": [_s("You are terse."), *SINGLE],
    "system_multi": [_s("You are a colour expert.\nAnswer briefly."), *MULTI],
    "system_whitespace": [_s("  Be kind.\n\n"), *WHITESPACE],
}


def _has_system(msgs: list[dict]) -> bool:
    return any(m["role"] == "system" for m in msgs)


FAMILY_CONVERSATIONS = [
    pytest.param(fam, conv, id=f"{fam}-{conv}")
    for fam in FAMILIES
    for conv, msgs in CONVERSATIONS.items()
    if FAMILIES[fam].system or not _has_system(msgs)
]


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def _corpus(n: int = 3000) -> list[str]:
    rng = random.Random(1234)
    text = (
        "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
        "word but not what all were we when your can said there use an each which she do how their if will up "
        "other about out many then them these so some her would make like him into time has look two more write "
        "go see number no way could people my than first water been call who its now find long down day did get "
        "come made may part name colour blue green red forest spring capital France Paris list please sure here "
        "thanks welcome line second indented because another three say why answer question assistant user model "
        "system helpful kind brief expert"
    )
    words = text.split()
    out = []
    for _ in range(n):
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        out.append(sent[0].upper() + sent[1:] + rng.choice([".", "?", "!", ",", ":", "\n", ".\n\n"]))
    return out


@pytest.fixture(scope="module")
def base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    for s in SPECIAL_TOKENS:  # atomic: one id each, and never split
        assert tok.encode(f"a{s}b").tokens.count(s) == 1
    return tok


@pytest.fixture(scope="module")
def make_tokenizer(base_tokenizer):
    cache: dict = {}

    def make(family: str, template: str | None = None) -> PreTrainedTokenizerFast:
        key = (family, template)
        if key not in cache:
            fam = FAMILIES[family]
            tok = PreTrainedTokenizerFast(
                tokenizer_object=base_tokenizer,  # deep-copied by transformers
                bos_token=fam.bos,
                eos_token=fam.eos,
                pad_token=fam.pad,
                clean_up_tokenization_spaces=False,
            )
            tok.chat_template = template or fam.template
            cache[key] = tok
        return cache[key]

    return make


# --------------------------------------------------------------------------------------------------------------
# Oracle checks
# --------------------------------------------------------------------------------------------------------------


def _overlaps(tok: tuple[int, int], span: tuple[int, int]) -> bool:
    return tok[0] < span[1] and tok[1] > span[0]


def _oracle(tok, family: str, msgs: list[dict]):
    """Oracle rendering + its tokenization (ids, offsets), after checking the formatter matches the template."""
    rendered = FAMILIES[family].fmt(msgs)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == rendered.text, "test bug: the oracle formatter disagrees with the real template"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    assert all(b > a for a, b in offsets), "test bug: zero-width token offsets"
    return rendered, list(enc["input_ids"]), offsets


def _eot_index(offsets, turn: Turn) -> int:
    (idx,) = [i for i, o in enumerate(offsets) if o == turn.eot]
    return idx


def check_labels(tok, family: str, msgs: list[dict], out: dict, *, active=None, limit: int | None = None) -> None:
    """Asserts ``out`` trains exactly the ``active`` assistant turns (ordinals; default all) of ``msgs``.

    ``limit`` is the truncation length: only the first ``limit`` oracle tokens are expected.
    """
    rendered, ids, offsets = _oracle(tok, family, msgs)
    if limit is not None:
        ids, offsets = ids[:limit], offsets[:limit]
    n_turns = len(rendered.turns)
    active = set(range(n_turns)) if active is None else set(active)
    eot_id = tok.convert_tokens_to_ids(FAMILIES[family].eot)

    assert out["input_ids"] == ids, "input_ids differ from tokenizing the rendered template text"
    labels = out["labels"]
    assert len(labels) == len(ids)
    assert all(lab in (IGNORE, i) for lab, i in zip(labels, ids, strict=True)), (
        "a label is neither -100 nor its input id"
    )

    problems = []
    for k, (o, lab) in enumerate(zip(offsets, labels, strict=True)):
        must = may = False
        for t_idx, turn in enumerate(rendered.turns):
            if t_idx not in active:
                continue
            if _overlaps(o, turn.strip) or o == turn.eot:
                must = True
            elif _overlaps(o, turn.raw):
                may = True
        trained = lab != IGNORE
        if must and not trained:
            problems.append(f"token {k} {rendered.text[o[0] : o[1]]!r} should be trained")
        if not must and not may and trained:
            problems.append(f"token {k} {rendered.text[o[0] : o[1]]!r} must not be trained")
    assert not problems, f"{family}: " + "; ".join(problems[:10])

    for t_idx, turn in enumerate(rendered.turns):
        region = (turn.raw[0], turn.eot[1])
        idxs = [k for k, o in enumerate(offsets) if _overlaps(o, region)]
        trained = [k for k in idxs if labels[k] != IGNORE]
        if t_idx not in active:
            assert not trained, f"{family}: inactive assistant turn {t_idx} is trained"
            continue
        e = _eot_index(offsets, turn)
        assert ids[e] == eot_id and labels[e] == eot_id, f"{family}: turn {t_idx} end-of-turn token not trained"
        assert trained == list(range(trained[0], e + 1)), f"{family}: turn {t_idx} trained tokens not contiguous"
        decoded = tok.decode([ids[k] for k in trained], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        marker = FAMILIES[family].eot
        assert decoded.endswith(marker)
        assert decoded[: -len(marker)].strip() == turn.content.strip(), f"{family}: turn {t_idx}: {decoded!r}"


def _turn_token_ranges(tok, family, msgs):
    """(first content token, end-of-turn token) index per assistant turn, from the oracle."""
    rendered, _, offsets = _oracle(tok, family, msgs)
    out = []
    for turn in rendered.turns:
        first = min(k for k, o in enumerate(offsets) if _overlaps(o, turn.strip))
        out.append((first, _eot_index(offsets, turn)))
    return out


# --------------------------------------------------------------------------------------------------------------
# a) every family x conversation, against the oracle
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "conv"), FAMILY_CONVERSATIONS)
def test_all_assistant_matches_oracle(make_tokenizer, family, conv):
    tok = make_tokenizer(family)
    msgs = CONVERSATIONS[conv]
    out = encode_chat(msgs, tok, example_id=EXAMPLE_ID)
    check_labels(tok, family, msgs, out)
    # every assistant turn is trained, and no more turns than there are
    n_assistant = sum(m["role"] == "assistant" for m in msgs)
    eot_id = tok.convert_tokens_to_ids(FAMILIES[family].eot)
    assert sum(lab == eot_id for lab in out["labels"]) == n_assistant


def test_qwen2_default_system_prompt_is_rendered_and_not_trained(make_tokenizer):
    tok = make_tokenizer("qwen2_chatml")
    out = encode_chat(SINGLE, tok)
    text = tok.decode(out["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    trained = tok.decode([lab for lab in out["labels"] if lab != IGNORE], skip_special_tokens=False)
    assert "helpful" not in trained
    assert trained.strip() == "The capital of France is Paris.<|im_end|>"


def test_messages_are_not_mutated(make_tokenizer):
    msgs = [dict(m) for m in CONVERSATIONS["system_whitespace"]]
    before = [dict(m) for m in msgs]
    encode_chat(msgs, make_tokenizer("mistral"))
    assert msgs == before


# --------------------------------------------------------------------------------------------------------------
# b) train_on
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("conv", ["multi", "whitespace", "single"])
def test_train_on_last_assistant(make_tokenizer, family, conv):
    tok = make_tokenizer(family)
    msgs = CONVERSATIONS[conv]
    out = encode_chat(msgs, tok, train_on="last_assistant", example_id=EXAMPLE_ID)
    n = sum(m["role"] == "assistant" for m in msgs)
    check_labels(tok, family, msgs, out, active={n - 1})
    full = encode_chat(msgs, tok, train_on="all_assistant")
    assert out["input_ids"] == full["input_ids"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_on_all(make_tokenizer, family):
    tok = make_tokenizer(family)
    out = encode_chat(MULTI, tok, train_on="all")
    _, ids, _ = _oracle(tok, family, MULTI)
    assert out["input_ids"] == ids
    assert out["labels"] == out["input_ids"]


# --------------------------------------------------------------------------------------------------------------
# c) pad == eos
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mistral", "zephyr", "phi3"])
def test_pad_equal_to_eos_keeps_end_of_turn_labels(make_tokenizer, family):
    tok = make_tokenizer(family)
    assert tok.pad_token_id == tok.eos_token_id
    msgs = CONVERSATIONS["system_multi"]
    out = encode_chat(msgs, tok)
    ids, labels = out["input_ids"], out["labels"]
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids(FAMILIES[family].eot)
    in_input = sum(i == eos for i in ids)
    trained = sum(lab == eos for lab in labels)
    if family == "mistral":  # </s> only after assistant turns: all of them trained
        assert in_input == trained == 3
    elif family == "zephyr":  # </s> after every message: only the 3 assistant ones trained
        assert in_input == len(msgs) and trained == 3  # (check_labels: exactly the assistant ones)
    else:  # phi3: eos (= pad) closes the sequence and is not an end of turn; <|end|> is
        assert eot != eos
        assert in_input == 1 and trained == 0 and ids[-1] == eos and labels[-1] == IGNORE
        assert sum(lab == eot for lab in labels) == 3
    check_labels(tok, family, msgs, out)


# --------------------------------------------------------------------------------------------------------------
# d) broken templates -> MaskError naming the example
# --------------------------------------------------------------------------------------------------------------


def _chatml_variant(assistant_expr: str, generation_prompt: str = "<|im_start|>assistant\n") -> str:
    return (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}" + assistant_expr + "{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '" + generation_prompt + "' }}{% endif %}"
    )


BROKEN_TEMPLATES = {
    # assistant content never rendered
    "drops_content": _chatml_variant("{{ '<|im_start|>assistant\n<|im_end|>\n' }}"),
    # content altered
    "upper_cases_content": _chatml_variant(
        "{{ '<|im_start|>assistant\n' + message['content'] | upper + '<|im_end|>\n' }}"
    ),
    "truncates_content": _chatml_variant("{{ '<|im_start|>assistant\n' + message['content'][:-4] + '<|im_end|>\n' }}"),
    "duplicates_content": _chatml_variant(
        "{{ '<|im_start|>assistant\n' + message['content'] + message['content'] + '<|im_end|>\n' }}"
    ),
    # earlier assistant turns rendered differently from when they were the one being generated
    "rewrites_history": _chatml_variant(
        "{{ '<|im_start|>assistant\n' + ('[omitted]' if not loop.last else message['content']) + '<|im_end|>\n' }}"
    ),
    # no end-of-turn special token after the assistant content
    "no_end_of_turn": _chatml_variant("{{ '<|im_start|>assistant\n' + message['content'] + '\n' }}"),
    "plain_text_end_of_turn": _chatml_variant("{{ '<|im_start|>assistant\n' + message['content'] + '\nEND\n' }}"),
    "text_between_content_and_eot": _chatml_variant(
        "{{ '<|im_start|>assistant\n' + message['content'] + ' (end)<|im_end|>\n' }}"
    ),
    # the generation prompt is not the header the template writes before real assistant turns
    "generation_prompt_mismatch": _chatml_variant(
        "{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}",
        generation_prompt="<|im_start|>model\n",
    ),
}


@pytest.mark.parametrize(
    ("broken", "conv"),
    # rewriting history needs an earlier assistant turn, so it has no single-turn case
    [(b, c) for b in BROKEN_TEMPLATES for c in ("single", "multi") if (b, c) != ("rewrites_history", "single")],
)
def test_broken_template_raises_mask_error(make_tokenizer, broken, conv):
    tok = make_tokenizer("qwen2_chatml", BROKEN_TEMPLATES[broken])
    with pytest.raises(MaskError) as err:
        encode_chat(CONVERSATIONS[conv], tok, example_id=EXAMPLE_ID)
    assert EXAMPLE_ID in str(err.value)


# Mistral variant whose earlier assistant turns have no </s>: what follows their content is the NEXT user
# turn's opener " [INST]", which is no end-of-turn marker (a model trained on it would end turns with [INST]).
MISTRAL_EOS_ONLY_ON_LAST_TURN = MISTRAL.replace(
    "{{- ' ' + message['content'] + eos_token}}", "{{- ' ' + message['content'] + (eos_token if loop.last else '')}}"
)


def test_broken_mistral_without_eos_on_earlier_turns_raises(make_tokenizer):
    assert MISTRAL_EOS_ONLY_ON_LAST_TURN != MISTRAL
    tok = make_tokenizer("mistral", MISTRAL_EOS_ONLY_ON_LAST_TURN)
    encode_chat(SINGLE, tok)  # one turn: fine
    with pytest.raises(MaskError) as err:
        encode_chat(MULTI, tok, example_id=EXAMPLE_ID)
    assert EXAMPLE_ID in str(err.value)


def test_template_without_chat_template_raises(base_tokenizer):
    tok = PreTrainedTokenizerFast(tokenizer_object=base_tokenizer, eos_token="</s>")
    tok.chat_template = None
    with pytest.raises(ValueError) as err:
        encode_chat(SINGLE, tok, example_id=EXAMPLE_ID)
    assert EXAMPLE_ID in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# e) template errors carry the template's own message
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "msgs", "expected"),
    [
        pytest.param("mistral", [_u("a"), _u("b"), _a("c")], MISTRAL_ALTERNATE_MSG, id="mistral-user-user"),
        # (system then assistant is rejected before the template sees it: assistant_first)
        pytest.param(
            "mistral", [_s("s"), _u("a"), _u("b"), _a("c")], MISTRAL_ALTERNATE_MSG, id="mistral-system-user-user"
        ),
        pytest.param(
            "mistral",
            [_u("a"), _a("b"), _s("late system"), _a("c")],
            MISTRAL_ALTERNATE_MSG,
            id="mistral-late-system",
        ),
        pytest.param("gemma", [_s("s"), *SINGLE], "System role not supported", id="gemma-system"),
        pytest.param(
            "gemma",
            [_u("a"), _a("b"), _a("c")],
            "Conversation roles must alternate user/assistant/user/assistant/...",
            id="gemma-assistant-assistant",
        ),
    ],
)
def test_template_exception_text_is_surfaced(make_tokenizer, family, msgs, expected):
    with pytest.raises(ValueError) as err:
        encode_chat(msgs, make_tokenizer(family), example_id=EXAMPLE_ID)
    assert not isinstance(err.value, MaskError), "a template rejection is a message problem, not a mask problem"
    assert expected in str(err.value)
    assert EXAMPLE_ID in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# f) truncation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncation_keeps_only_complete_turns(make_tokenizer, family):
    tok = make_tokenizer(family)
    msgs = MULTI
    _, (f1, e1), (_, e2) = _turn_token_ranges(tok, family, msgs)
    full = encode_chat(msgs, tok)
    n = len(full["input_ids"])

    # cut inside the second assistant turn (one content token kept / everything but its end-of-turn kept)
    for limit in (f1 + 1, e1):
        out = encode_chat(msgs, tok, max_length=limit, example_id=EXAMPLE_ID)
        assert len(out["input_ids"]) == limit
        check_labels(tok, family, msgs, out, active={0}, limit=limit)

    # cut just after the second turn's end-of-turn token: two turns complete
    out = encode_chat(msgs, tok, max_length=e1 + 1)
    check_labels(tok, family, msgs, out, active={0, 1}, limit=e1 + 1)

    # cut inside the third: first two kept
    out = encode_chat(msgs, tok, max_length=e2)
    check_labels(tok, family, msgs, out, active={0, 1}, limit=e2)

    # no-op limits
    for limit in (n, n + 50):
        assert encode_chat(msgs, tok, max_length=limit) == full


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncation_inside_first_turn_raises(make_tokenizer, family):
    tok = make_tokenizer(family)
    (f0, e0), *_ = _turn_token_ranges(tok, family, MULTI)
    for limit in (2, f0, f0 + 1, e0):  # before it, at its start, inside it, just before its end-of-turn token
        with pytest.raises(MaskError) as err:
            encode_chat(MULTI, tok, max_length=limit, example_id=EXAMPLE_ID)
        assert EXAMPLE_ID in str(err.value)
    # exactly up to the first turn's end-of-turn token: that turn alone is trained
    out = encode_chat(MULTI, tok, max_length=e0 + 1, example_id=EXAMPLE_ID)
    check_labels(tok, family, MULTI, out, active={0}, limit=e0 + 1)


@pytest.mark.parametrize("family", ["llama3", "zephyr"])
def test_truncation_with_last_assistant(make_tokenizer, family):
    tok = make_tokenizer(family)
    *_, (_, e2) = _turn_token_ranges(tok, family, MULTI)
    out = encode_chat(MULTI, tok, train_on="last_assistant", max_length=e2 + 1)
    check_labels(tok, family, MULTI, out, active={2}, limit=e2 + 1)
    with pytest.raises(MaskError):  # the only trained turn is cut
        encode_chat(MULTI, tok, train_on="last_assistant", max_length=e2, example_id=EXAMPLE_ID)


def test_truncation_with_train_on_all(make_tokenizer):
    tok = make_tokenizer("llama3")
    out = encode_chat(MULTI, tok, train_on="all", max_length=5)
    assert out["labels"] == out["input_ids"] and len(out["input_ids"]) == 5


# --------------------------------------------------------------------------------------------------------------
# malformed messages
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msgs",
    [
        pytest.param([_u("hi"), {"role": "robot", "content": "beep"}], id="unknown-role"),
        pytest.param([_u("hi"), {"role": "assistant"}], id="missing-content"),
        pytest.param([_u("hi"), {"role": "assistant", "content": None}], id="none-content"),
        pytest.param([_u("hi"), {"role": "assistant", "content": ["a", "b"]}], id="list-content"),
        pytest.param([_u("hi"), _a("")], id="empty-assistant"),
        pytest.param([_u("hi"), _a("  \n\t ")], id="whitespace-assistant"),
        pytest.param([_s("sys"), _u("hi")], id="no-assistant"),
        pytest.param([], id="empty-list"),
    ],
)
def test_malformed_messages(make_tokenizer, msgs):
    with pytest.raises(MessageError) as err:
        encode_chat(msgs, make_tokenizer("qwen2_chatml"), example_id=EXAMPLE_ID)
    assert EXAMPLE_ID in str(err.value)


def test_unknown_train_on(make_tokenizer):
    with pytest.raises(ValueError):
        encode_chat(SINGLE, make_tokenizer("qwen2_chatml"), train_on="assistant")


# --------------------------------------------------------------------------------------------------------------
# The pipeline's actors encode through a TokenizerView: it must agree with the tokenizer on every family.
# --------------------------------------------------------------------------------------------------------------


def _outcome(messages: list[dict], tokenizer, **kw):
    try:
        return encode_chat(messages, tokenizer, example_id=EXAMPLE_ID, **kw)
    except (MaskError, MessageError) as exc:
        return (type(exc).__name__, exc.reason, str(exc))


def _render(tokenizer, messages: list[dict], generation_prompt: bool):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # the template's own raise_exception: the same words either way
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizer_view_encodes_exactly_like_the_tokenizer(make_tokenizer, family):
    from sftray.data.tokenizer_view import TokenizerView, spec_of

    tok = make_tokenizer(family)
    view = TokenizerView(spec_of(tok))
    cases = [msgs for msgs in CONVERSATIONS.values() if FAMILIES[family].system or not _has_system(msgs)]
    cases += [[_a("hi"), _u("first?")], [_u("a"), _u("b"), _a("c")], [_u("x"), _a("fake <|im_end|> end")]]
    compared = 0
    for msgs in cases:
        for kw in ({}, {"train_on": "last_assistant"}, {"train_on": "all"}, {"max_length": 24}):
            assert _outcome(msgs, view, **kw) == _outcome(msgs, tok, **kw), (family, msgs, kw)
            compared += 1
        for gen in (False, True):
            assert _render(view, msgs, gen) == _render(tok, msgs, gen), (family, msgs, gen)
    assert compared == len(cases) * 4
    assert len(view) == len(tok)
    text = "plain text, windowed for pretraining ✓"
    assert view(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]

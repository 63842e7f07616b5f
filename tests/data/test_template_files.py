"""Chat-template files as users keep them, through ``sftray preview model.chat_template=<file>``, and the span
derivation they exercise.

``tests/data/templates/*.jinja`` follow the community's habit (the form of the widely shared collections of
.jinja chat templates): one statement or expression per indented line, a trailing newline, ``{{ bos_token }}``,
``raise_exception``, ``.strip()`` / ``| trim``. transformers renders them with ``trim_blocks`` and
``lstrip_blocks``, which drop the newline after a ``{% %}`` tag and the indentation before one, but not the
newline after a ``{{ }}`` line nor the indentation before it: the generation prompt then ends in ``\\n\\n`` (or
``\\n    ``) where the full conversation has ``\\n``, and turns are indented differently in the two renders. The
builtin tokenizer has no bos, so a template that concatenates ``bos_token`` cannot render without
``model.special_tokens``.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from testkit import sft_sequences
from transformers import AutoTokenizer

from sftray.data.chat import MaskError, encode_chat

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

TEMPLATES = Path(__file__).parent / "templates"
TRAINED = re.compile(r"\{\+(.*?)\+\}", re.S)
EOS = "<|endoftext|>"  # the builtin tokenizer's eos

CHATS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."},
    ],
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
]
ANSWERS = ["Paris.", "Rome, since 1871.", "5"]

# file -> the end-of-turn token each assistant turn must be trained with
AS_IS = {
    "alpaca.jinja": EOS,  # generation prompt "### Response:\n" + the file's newline; prints {{ bos_token }}
    "chatml.jinja": "<|im_end|>",
    "gemma-it.jinja": "<end_of_turn>",
    "mistral-instruct.jinja": EOS,
    "zephyr.jinja": EOS,
}
# file -> (the bos a user supplies, the end-of-turn token): these concatenate bos_token
NEEDS_BOS = {
    "vicuna.jinja": ("<s>", EOS),
    "llama-3-instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "openchat.jinja": ("<s>", "<|end_of_turn|>"),
}


pytestmark = pytest.mark.usefixtures("cli_env")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def chats_file(tmp_path: Path, chats: list[list[dict]] = CHATS) -> Path:
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def preview(capsys: pytest.CaptureFixture[str], tmp_path: Path, template: str, *extra: str) -> tuple[int, str, str]:
    data = chats_file(tmp_path)
    return run(
        capsys,
        "preview",
        "data=files",
        f"data.sources=[{{path:{data}}}]",
        f"model.chat_template={TEMPLATES / template}",
        *extra,
    )


def trained(out: str) -> list[str]:
    return TRAINED.findall(out.split("\n", 1)[1])


@pytest.mark.parametrize("template", sorted(AS_IS))
def test_preview_template_file_as_is(capsys: pytest.CaptureFixture[str], tmp_path: Path, template: str) -> None:
    code, out, err = preview(capsys, tmp_path, template)
    assert (code, err) == (0, ""), err
    assert "ERROR" not in out, out
    eot = AS_IS[template]
    # Exactly each answer and its end-of-turn token are trained (byte-level BPE may glue a separating space).
    assert [s.strip() for s in trained(out)] == [a + eot for a in ANSWERS], out


def test_preview_warns_of_a_printed_bos_and_a_whitespace_drift(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """alpaca.jinja prints {{ bos_token }} (nothing on this tokenizer, as in transformers) and its generation
    prompt ends in a blank line: both work, and both are said once, before any example, with the fix."""
    with caplog.at_level("WARNING", logger="sftray.models.loading"):
        code, out, err = preview(capsys, tmp_path, "alpaca.jinja")
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert (
        warnings[0].startswith(r"model.chat_template: the generation prompt ends '") and "\\n\\n' where" in warnings[0]
    )
    assert "{{- ... }}" in warnings[0]
    assert warnings[1] == (
        "model.chat_template: the template prints bos_token, which the tokenizer of builtin:tiny-llama does not "
        "define: it renders as nothing, as in transformers; if the model expects one, supply it with "
        "+model.special_tokens.bos_token='<s>' (the model's own bos_token text; a token not in the vocabulary is "
        "added as a special token)"
    )


@pytest.mark.parametrize("template", sorted(NEEDS_BOS))
def test_preview_template_needs_bos(capsys: pytest.CaptureFixture[str], tmp_path: Path, template: str) -> None:
    code, out, err = preview(capsys, tmp_path, template)
    assert code == 1
    assert err.startswith("error: model.chat_template: the template uses bos_token, which the tokenizer of "), err
    assert "+model.special_tokens.bos_token='<s>'" in err, err
    assert err.count("\n") == 1  # one line

    bos, eot = NEEDS_BOS[template]
    code, out, err = preview(capsys, tmp_path, template, f"+model.special_tokens.bos_token='{bos}'")
    assert (code, err) == (0, ""), err
    assert "ERROR" not in out, out
    assert [s.strip() for s in trained(out)] == [a + eot for a in ANSWERS], out
    assert out.count(bos) == len(CHATS)  # the supplied bos opens each conversation, untrained


def test_preview_template_raise_exception_is_a_row_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A template's own raise_exception() stays a per-row error with its words; other rows go on."""
    twice = [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hi"},
    ]
    data = chats_file(tmp_path, [twice, CHATS[1]])
    code, out, err = run(
        capsys,
        "preview",
        "data=files",
        f"data.sources=[{{path:{data}}}]",
        f"model.chat_template={TEMPLATES / 'gemma-it.jinja'}",
    )
    assert (code, err) == (0, "")
    assert f"--- {data}:1: ERROR (template_rejected): " in out
    assert "Conversation roles must alternate user/assistant/user/assistant/..." in out
    assert [s.strip() for s in trained(out)] == ["5<end_of_turn>"]


def test_special_token_typo_lists_the_names(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "config", "+model.special_tokens.bso_token=x")
    assert (code, out) == (1, "")
    assert err == (
        "error: model.special_tokens.bso_token: not a special token name; valid: bos_token, eos_token, unk_token, "
        "sep_token, pad_token, cls_token, mask_token\n"
    )


# --- span derivation on template strings (no CLI) ------------------------------------------------------------------


def tokenizer(cli_cache: Path, template: str, **special: str) -> Any:
    """The builtin tokenizer as ``load_tokenizer`` gives it, with ``template`` (a string or a file)."""
    from sftray.config import ModelConfig
    from sftray.models.loading import load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny-llama", chat_template=template, special_tokens=special)
    return load_tokenizer(cfg, cache_dir=cli_cache)


def trained_runs(tok: Any, enc: dict[str, list[int]]) -> list[str]:
    runs, run_ids = [], []
    for token, label in [*zip(enc["input_ids"], enc["labels"]), (None, -100)]:
        if label != -100:
            run_ids.append(token)
        elif run_ids:
            runs.append(tok.decode(run_ids))
            run_ids = []
    return runs


# ChatML whose generation prompt ends in a blank line, as a one-expression-a-line file renders it.
BLANK_LINE_PROMPT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}"
)


def test_whitespace_only_drift_trains_exactly_the_turns(cli_cache: Path) -> None:
    tok = tokenizer(cli_cache, BLANK_LINE_PROMPT)
    assert tok.apply_chat_template(CHATS[0][:1], tokenize=False, add_generation_prompt=True).endswith("\n\n")
    enc = encode_chat(CHATS[0], tok)
    assert trained_runs(tok, enc) == ["Paris.<|im_end|>", "Rome, since 1871.<|im_end|>"]
    # The same ids as the template without the drift: only where the turn is found changed.
    exact = tokenizer(cli_cache, BLANK_LINE_PROMPT.replace("assistant\\n\\n", "assistant\\n"))
    assert encode_chat(CHATS[0], exact) == enc


def test_drift_beyond_whitespace_shows_both_renders_and_the_fix(cli_cache: Path) -> None:
    """A generation prompt that names the assistant differently from the full render: which text is the turn's
    is not knowable, so the error shows where the two renders part and how to fix the template."""
    renamed = BLANK_LINE_PROMPT.replace("'<|im_start|>assistant\\n\\n'", "'<|im_start|>bot\\n'")
    tok = tokenizer(cli_cache, renamed)
    with pytest.raises(MaskError) as err:
        encode_chat(CHATS[1], tok, example_id="row-3")
    msg = str(err.value)
    assert msg.startswith("row-3: assistant turn 1: the template renders the conversation up to this turn ")
    assert "beyond whitespace" in msg
    # Both renders, as reprs, around where they part: the prefix ends there, the full render goes on.
    assert r"Add 2 and 3.<|im_end|>\n<|im_start|>bot\n' (up to the turn)" in msg
    assert r"Add 2 and 3.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n' (full)" in msg
    assert "Fix the template (model.chat_template)" in msg


def test_whitespace_where_the_full_render_has_none_is_not_guessed(cli_cache: Path) -> None:
    """Whitespace inside the prompt facing none in the full render (not at the boundary) is a real difference."""
    spaced = BLANK_LINE_PROMPT.replace("'<|im_start|>assistant\\n\\n'", "'<|im_start|> assistant\\n'")
    with pytest.raises(MaskError, match="beyond whitespace"):
        encode_chat(CHATS[1], tokenizer(cli_cache, spaced))


def test_content_is_still_checked_after_whitespace_drift(cli_cache: Path) -> None:
    """The whitespace-tolerant location still requires the turn's own content right after the prompt."""
    shouting = BLANK_LINE_PROMPT.replace("+ m['content'] +", "+ (m['content'] | upper) +")
    with pytest.raises(MaskError, match="not the turn's content"):
        encode_chat(CHATS[0], tokenizer(cli_cache, shouting))


def test_missing_special_token_found_by_rendering(cli_cache: Path) -> None:
    from sftray.data.chat import undefined_template_tokens

    printed = "{{ bos_token }}" + BLANK_LINE_PROMPT
    concatenated = "{{ bos_token + '' }}" + BLANK_LINE_PROMPT
    assert undefined_template_tokens(tokenizer(cli_cache, BLANK_LINE_PROMPT)) == {}
    assert undefined_template_tokens(tokenizer(cli_cache, printed)) == {"bos_token": False}
    with pytest.raises(ValueError, match=r"^model.chat_template: the template uses bos_token, which the tokenizer"):
        tokenizer(cli_cache, concatenated)
    tok = tokenizer(cli_cache, concatenated, bos_token="<s>")
    assert undefined_template_tokens(tok) == {}
    assert tok.bos_token == "<s>" and tok.convert_tokens_to_ids("<s>") == len(tok) - 1  # added: one new token
    assert tok.apply_chat_template(CHATS[1], tokenize=False).startswith("<s><|im_start|>user")


def test_missing_special_token_per_row_names_the_knob(cli_cache: Path) -> None:
    """A branch the load-time probes do not reach still fails with the token and the knob, as a row error."""
    from sftray.data.errors import MessageError

    only_long = "{% if messages | length > 2 %}{{ bos_token + '' }}{% endif %}" + BLANK_LINE_PROMPT
    tok = tokenizer(cli_cache, only_long.replace("> 2", "> 5"))  # the probes have at most 5 messages
    with pytest.raises(MessageError, match=r"uses bos_token.*\+model\.special_tokens\.bos_token='<s>'") as err:
        encode_chat(CHATS[0] + CHATS[1], tok, example_id="row-9")
    assert err.value.reason == "template_rejected" and str(err.value).startswith("row-9: the template uses")


def test_generation_prompt_drift_is_reported(cli_cache: Path) -> None:
    from sftray.data.chat import generation_prompt_drift

    assert generation_prompt_drift(tokenizer(cli_cache, BLANK_LINE_PROMPT.replace("\\n\\n'", "\\n'"))) is None
    prompt, full = generation_prompt_drift(tokenizer(cli_cache, BLANK_LINE_PROMPT))
    assert prompt.endswith("<|im_start|>assistant\n\n") and full.endswith("<|im_start|>assistant\nHello")


@pytest.mark.parametrize("template", sorted(AS_IS) + sorted(NEEDS_BOS))
def test_template_file_same_through_the_worker_view(cli_cache: Path, template: str) -> None:
    """Ray workers encode through a TokenizerView: it must agree with the tokenizer on every template file."""
    from sftray.data.tokenizer_view import TokenizerView, spec_of

    special = {"bos_token": NEEDS_BOS[template][0]} if template in NEEDS_BOS else {}
    tok = tokenizer(cli_cache, str(TEMPLATES / template), **special)
    view = TokenizerView(spec_of(tok))
    for chat in CHATS:
        assert encode_chat(chat, view) == encode_chat(chat, tok)


@pytest.mark.ray
@pytest.mark.slow
def test_prep_with_a_template_file_and_a_supplied_bos(ray_local, cli_cache: Path, tmp_path: Path, capsys) -> None:
    """``sftray prep`` with the llama-3 file on the bos-less builtin tokenizer: every conversation of several blocks
    is kept, encoded by the workers as the saved tokenizer encodes it, opened by the supplied bos."""
    from collections import Counter

    from sftray.data.prepared import load_prepared

    folder = tmp_path / "chats"
    folder.mkdir()
    chats = []
    for f in range(3):
        rows = [CHATS[i % 2] if i % 50 else [*CHATS[0][:2], *CHATS[1]] for i in range(400)]
        rows = [[{**m, "content": f"{m['content']} ({f}.{i})"} for m in chat] for i, chat in enumerate(rows)]
        (folder / f"{f}.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in rows))
        chats += rows
    out = tmp_path / "out"
    code = main(
        [
            "prep",
            f"paths.cache_dir={cli_cache}",
            f"paths.output_dir={out}",
            "data=files",
            f"data.sources=[{{path:'{folder}'}}]",
            "data.max_seq_len=128",
            "mix=none",
            f"model.chat_template={TEMPLATES / 'llama-3-instruct.jinja'}",
            "+model.special_tokens.bos_token='<|begin_of_text|>'",
        ]
    )
    assert code == 0, capsys.readouterr().err
    (folder_out,) = (out / "data").iterdir()
    prepared = load_prepared(folder_out)
    assert prepared.report["drops"] == {}
    assert prepared.report["conversations"]["train"] + prepared.report["conversations"]["val"] == len(chats)
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    assert tok.bos_token == "<|begin_of_text|>"
    got = sft_sequences(prepared)
    assert got == Counter(tuple(encode_chat(c, tok)["input_ids"]) for c in chats)
    for ids in got:  # the bos opens each conversation, after the indentation of the file's {{ content }} line
        assert ids.count(tok.bos_token_id) == 1 and not tok.decode(ids[: ids.index(tok.bos_token_id)]).strip()

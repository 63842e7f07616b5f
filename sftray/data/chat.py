"""Chat encoding: render a conversation with the tokenizer's own template, derive and verify its loss mask.

Most real chat templates carry no ``{% generation %}`` markers, some trim content, some inject a default system
prompt or today's date. So the assistant spans are derived, not assumed, in three steps that hold for any template
whose rendering of a conversation prefix is a prefix of the full rendering (true of ChatML, Llama-3, Mistral,
Gemma, Phi-3, Zephyr and most others):

1. render the whole conversation once and tokenize it with character offsets;
2. for assistant turn ``i``, render ``messages[:i]`` with the generation prompt: its length is where turn ``i``
   starts (when the two renders differ in whitespace only, as a template file kept one expression a line makes
   them, where its non-whitespace text ends in the full render); the turn's (possibly trimmed) content must
   follow, separated by whitespace at most, and the first special token after the content, again separated by
   whitespace at most, is its end-of-turn marker;
3. label exactly the tokens overlapping [content start, end of marker), then decode them and compare with
   content + marker. Any disagreement, an empty mask, or a missing end-of-turn marker raises ``MaskError``.

Labels are built from spans, never from token ids, so ``pad == eos`` cannot hide the end-of-turn label.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Sequence
from typing import Any

from sftray.config import SPECIAL_TOKEN_NAMES
from sftray.data.errors import MaskError, MessageError

IGNORE_INDEX = -100
"""Label value that transformers' cross-entropy ignores."""

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant", "last_assistant", "all")

_WS = re.compile(r"\s+")


def validate_messages(messages: Any, *, example_id: str | None = None) -> list[dict[str, str]]:
    """Checks roles and contents; returns the messages as plain ``{"role", "content"}`` dicts."""
    where = _where(example_id)
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise MessageError(
            f"{where}: expected a non-empty list of messages, got {type(messages).__name__}", reason="bad_messages"
        )
    clean: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise MessageError(
                f"{where}: message {i} is a {type(msg).__name__}, expected an object", reason="bad_messages"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise MessageError(
                f"{where}: message {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)}",
                reason="unknown_role",
            )
        if "content" not in msg:
            raise MessageError(f"{where}: message {i} ({role}) has no 'content'", reason="bad_content")
        if not isinstance(content, str):
            raise MessageError(
                f"{where}: message {i} ({role}) content is a {type(content).__name__}, expected a string",
                reason="bad_content",
            )
        if role == "assistant" and not content.strip():
            raise MessageError(
                f"{where}: message {i} (assistant) has empty content: nothing to train on", reason="empty_assistant"
            )
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise MessageError(f"{where}: conversation has no assistant turn: nothing to train on", reason="no_assistant")
    return clean


def encode_chat(
    messages: list[dict],
    tokenizer: Any,
    *,
    train_on: str = "all_assistant",
    max_length: int | None = None,
    example_id: str | None = None,
) -> dict[str, list[int]]:
    """Tokenizes one conversation with its loss mask.

    Returns ``{"input_ids", "labels"}``: lists of equal length, not shifted (``labels[i]`` is ``-100`` or
    ``input_ids[i]``; transformers' causal LMs shift internally). ``train_on`` is ``all_assistant`` (every
    assistant turn with its end-of-turn marker), ``last_assistant`` or ``all`` (no masking, e.g. for
    conversation simulators). ``max_length`` truncates; an assistant turn cut by the truncation is left
    untrained, so every trained span is a complete, verified turn. Raises ``MessageError`` for malformed input
    (``assistant_first`` when an assistant turn precedes every user turn, unless ``train_on="all"``) or a template
    that rejects it and ``MaskError`` when no valid mask remains; both name ``example_id``.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; valid values: {', '.join(TRAIN_ON)}")
    where = _where(example_id, messages)
    msgs = validate_messages(messages, example_id=where)
    if train_on != "all":
        _require_prompt(msgs, where=where)
    if not getattr(tokenizer, "is_fast", False):
        raise MaskError(f"{where}: tokenizer {type(tokenizer).__name__} is not a fast tokenizer; masks need offsets")

    _reject_control_text(tokenizer, msgs, where=where)
    text = _render(tokenizer, msgs, add_generation_prompt=False, where=where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]

    if train_on == "all":
        labels = list(input_ids)
        spans: list[tuple[int, int]] = []
    else:
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if train_on == "last_assistant":
            turns = turns[-1:]
        labels = [IGNORE_INDEX] * len(input_ids)
        spans = []
        markers: set[str] = set()
        for turn in turns:
            start, end, marker = _assistant_span(tokenizer, msgs, turn, text, where=where)
            markers.add(marker)
            if len(markers) > 1:
                # A template ends every assistant turn the same way; differing markers mean some turn is
                # followed by the next turn's opener instead of an end-of-turn token.
                raise MaskError(
                    f"{where}: assistant turns end with different tokens ({', '.join(sorted(markers))}); "
                    "the template does not close every assistant turn with an end-of-turn token"
                )
            token_span = _token_span(offsets, start, end)
            if token_span is None:
                raise MaskError(f"{where}: assistant turn {turn} maps to no tokens")
            lo, hi = token_span
            _verify_turn(tokenizer, input_ids[lo:hi], msgs[turn]["content"], marker, turn=turn, where=where)
            labels[lo:hi] = input_ids[lo:hi]
            spans.append((lo, hi))

    if max_length is not None and len(input_ids) > max_length:
        input_ids = input_ids[:max_length]
        labels = labels[:max_length]
        if train_on != "all":
            # A turn cut in two would teach a response that never ends: untrain it entirely.
            for lo, hi in spans:
                if lo < max_length < hi:
                    labels[lo:max_length] = [IGNORE_INDEX] * (max_length - lo)

    if all(label == IGNORE_INDEX for label in labels):
        why = f"after truncation to {max_length} tokens" if max_length is not None else "for this template"
        raise MaskError(
            f"{where}: empty loss mask {why}: no complete assistant turn is trained",
            reason="too_long" if max_length is not None else "empty_mask",
        )
    return {"input_ids": input_ids, "labels": labels}


def template_hash(tokenizer: Any) -> str:
    """Short, stable hash of the tokenizer's chat template (for reports and run tags)."""
    import hashlib

    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: hash them all, in name order
        template = "\n".join(f"{k}\n{v}" for k, v in sorted(template.items()))
    return hashlib.sha256(template.encode()).hexdigest()[:16]


# --- internals -----------------------------------------------------------------------------------------------


def _where(example_id: str | None, messages: Any = None) -> str:
    if example_id:
        return str(example_id)
    if isinstance(messages, Sequence) and messages and isinstance(messages[0], dict):
        first = str(messages[0].get("content", ""))[:40]
        return f"conversation starting {first!r}"
    return "conversation"


def _require_prompt(msgs: list[dict], *, where: str) -> None:
    """An assistant turn before any user turn answers nothing (and its prefix is empty: templates reject it)."""
    first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
    if first is not None and msgs[first]["role"] == "assistant":
        raise MessageError(
            f"{where}: message {first} (assistant) starts the conversation: there is no prompt for it to answer",
            reason="assistant_first",
        )


def _reject_control_text(tokenizer: Any, msgs: list[dict], *, where: str) -> None:
    """Content holding a special token's text would tokenize as a control token (e.g. a fake turn boundary)."""
    specials = _special_tokens(tokenizer)
    for i, msg in enumerate(msgs):
        hit = next((t for t in specials if t in msg["content"]), None)
        if hit is not None:
            raise MessageError(
                f"{where}: message {i} ({msg['role']}) contains the special token {hit!r} as text; it would be "
                "encoded as a control token. Remove or escape it.",
                reason="special_token_in_content",
            )


def _render(tokenizer: Any, msgs: list[dict], *, add_generation_prompt: bool, where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise MaskError(f"{where}: tokenizer has no chat_template; set model.chat_template")
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja's TemplateError and raise_exception(): the template's own words matter
        if missing := _undefined_token(exc):
            raise MessageError(f"{where}: {missing_token_message(missing)}", reason="template_rejected") from exc
        raise MessageError(
            f"{where}: the chat template rejected the conversation: {exc}", reason="template_rejected"
        ) from exc


_UNDEFINED = re.compile(r"'(\w+)' is undefined")
"""jinja's UndefinedError message: an undefined variable used in an operation (``bos_token + ...``)."""


def _undefined_token(exc: Exception) -> str | None:
    """The special token's name when ``exc`` is jinja failing on an undefined one (``'bos_token' is undefined``)."""
    match = _UNDEFINED.search(str(exc))
    return match[1] if match and match[1] in SPECIAL_TOKEN_NAMES else None


def missing_token_message(name: str, *, tokenizer_name: str = "", needed: bool = True) -> str:
    """The one-line message for a special token the chat template uses and the tokenizer lacks, with the knob:
    an error when rendering ``needed`` it, else the warning that it renders as nothing."""
    example = "<s>" if name == "bos_token" else "</s>" if name == "eos_token" else "..."
    of = f" of {tokenizer_name}" if tokenizer_name else ""
    supply = (
        f"+model.special_tokens.{name}='{example}' (the model's own {name} text; a token not in the vocabulary is "
        "added as a special token)"
    )
    if not needed:
        return (
            f"the template prints {name}, which the tokenizer{of} does not define: it renders as nothing, as in "
            f"transformers; if the model expects one, supply it with {supply}"
        )
    return (
        f"the template uses {name}, which the tokenizer{of} does not define; supply it with {supply} or remove "
        f"{name} from the template"
    )


_PROBES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye"},
    ],
)


def undefined_template_tokens(tokenizer: Any) -> dict[str, bool]:
    """The special tokens (``bos_token``, ...) the chat template reads and the tokenizer does not define.

    Each maps to whether rendering fails on it: jinja prints an undefined variable as nothing (``{{ bos_token }}``
    renders '', in transformers too) but fails on an operation with one (``bos_token + content``). Found by
    rendering probe conversations (a template that rejects a probe for other reasons skips it).
    """
    import jinja2
    import jinja2.meta

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return {}
    try:
        used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return {}  # rendering reports it
    defined = getattr(tokenizer, "special_tokens_map", {}) or {}
    gaps = {name: False for name in SPECIAL_TOKEN_NAMES if name in used and not defined.get(name)}
    for msgs in _PROBES if gaps else ():
        for upto, prompt in ((len(msgs), False), (len(msgs) - 1, True)):
            try:
                tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=prompt)
            except Exception as exc:
                if (name := _undefined_token(exc)) in gaps:
                    gaps[name] = True
    return gaps


_SPECIAL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _special_tokens(tokenizer: Any) -> list[str]:
    """Every atomic added/special token string, longest first (so a short token never shadows a longer one)."""
    size = len(tokenizer)  # changes when tokens are added, which invalidates the entry
    cached = _SPECIAL_CACHE.get(tokenizer)
    if cached is None or cached[0] != size:
        found = set(getattr(tokenizer, "all_special_tokens", []) or [])
        found.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
        cached = (size, sorted((t for t in found if t), key=len, reverse=True))
        _SPECIAL_CACHE[tokenizer] = cached
    return cached[1]


def _assistant_span(tokenizer: Any, msgs: list[dict], turn: int, text: str, *, where: str) -> tuple[int, int, str]:
    """Character span [content start, end-of-turn marker end) of assistant turn ``turn`` in ``text``."""
    prefix = _render(tokenizer, msgs[:turn], add_generation_prompt=True, where=where)
    start = _prompt_end(prefix, text)
    if isinstance(start, tuple):
        raise MaskError(f"{where}: assistant turn {turn}: {_render_mismatch(prefix, text, *start)}")
    content = msgs[turn]["content"].strip()
    gap_end = start + (len(text[start:]) - len(text[start:].lstrip()))
    if not text.startswith(content, gap_end):
        shown = text[start : start + 60]
        raise MaskError(
            f"{where}: assistant turn {turn}: the rendered text after the generation prompt is {shown!r}, "
            f"not the turn's content {content[:60]!r}"
        )
    content_end = gap_end + len(content)
    rest = text[content_end:]
    after_ws = content_end + (len(rest) - len(rest.lstrip()))
    # Tokens that open a turn (in the generation prompt) or a sequence (bos) never end one.
    opening = _render(tokenizer, msgs[:turn], add_generation_prompt=False, where=where) if turn else ""
    # Some templates end a conversation differently when no generation prompt follows (Phi-3 appends eos):
    # the header is what the generation prompt adds beyond their common prefix.
    header = prefix[len(os.path.commonprefix([prefix, opening])) :]
    not_markers = {getattr(tokenizer, "bos_token", None)}
    marker = next(
        (
            t
            for t in _special_tokens(tokenizer)
            if text.startswith(t, after_ws) and t not in not_markers and t not in header
        ),
        None,
    )
    if marker is None:
        raise MaskError(
            f"{where}: assistant turn {turn}: no end-of-turn special token follows the content "
            f"(next text: {text[content_end : content_end + 30]!r}); a model never trained on it never stops"
        )
    return gap_end, after_ws + len(marker), marker


def _prompt_end(prefix: str, text: str) -> int | tuple[int, int]:
    """Where the prefix render (with its generation prompt) ends in the full render ``text``.

    Exactly its length when ``text`` starts with it. Otherwise the two renders may differ in whitespace only: a
    template file kept one expression a line renders the newline after each ``{{ ... }}`` line and its
    indentation (transformers' ``trim_blocks``/``lstrip_blocks`` only trim around ``{% %}`` tags), so the
    generation prompt ends in ``\\n\\n`` where the full render has ``\\n``. Then every non-whitespace character of
    the prefix must match the full render's in order, each whitespace run must face a whitespace run, and the
    prefix's trailing whitespace faces whatever whitespace precedes the content: the turn's position is still
    unambiguous (the content and the decoded tokens are checked after). Returns (i, j), the positions in
    ``prefix`` and ``text`` where they first differ beyond whitespace, when they do.
    """
    if text.startswith(prefix):
        return len(prefix)
    i = j = 0
    while i < len(prefix):
        if prefix[i].isspace():
            i_end = len(prefix) - len(prefix[i:].lstrip())
            if i_end == len(prefix):
                return j  # the generation prompt's trailing whitespace: the content follows after text's own
            j_end = len(text) - len(text[j:].lstrip())
            if j_end == j:
                return (i, j)
            i, j = i_end, j_end
        elif j < len(text) and text[j] == prefix[i]:
            i, j = i + 1, j + 1
        else:
            return (i, j)
    return j


def generation_prompt_drift(tokenizer: Any) -> tuple[str, str] | None:
    """The end of the generation-prompt render and the same place in the full render (up to the assistant's text)
    when the two differ in whitespace only, found on a probe conversation; None when they agree (or differ beyond
    whitespace, which encoding reports per example). Masks are derived either way; at inference the prompt then
    ends in whitespace the model was never trained to continue from."""
    probe = _PROBES[0]
    try:
        full = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
        prompt = tokenizer.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
    except Exception:  # encoding reports a template that cannot render
        return None
    end = _prompt_end(prompt, full)
    if isinstance(end, tuple) or full.startswith(prompt):
        return None
    answer = full.find(probe[1]["content"], end)
    answer_end = answer + len(probe[1]["content"]) if answer >= 0 else end
    return prompt[-40:], full[max(0, answer_end - 45) : answer_end]


def _render_mismatch(prefix: str, text: str, i: int, j: int) -> str:
    """The error for renders that differ beyond whitespace: both texts around the divergence, and the fix."""
    return (
        "the template renders the conversation up to this turn (with add_generation_prompt) differently from the "
        f"full conversation, beyond whitespace: ...{prefix[max(0, i - 40) : i + 40]!r} (up to the turn) vs "
        f"...{text[max(0, j - 40) : j + 40]!r} (full), differing from character {i}; the assistant turn cannot "
        "be located. Fix the template (model.chat_template) so that its generation prompt is exactly the text "
        "that precedes an assistant message in the full conversation (earlier turns unchanged)"
    )


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """Token index range [lo, hi) of the tokens whose characters overlap [start, end)."""
    lo = hi = None
    for i, (a, b) in enumerate(offsets):
        if b > start and a < end and b > a:
            lo = i if lo is None else lo
            hi = i + 1
        elif a >= end:
            break
    return None if lo is None else (lo, hi)


def _verify_turn(tokenizer: Any, ids: list[int], content: str, marker: str, *, turn: int, where: str) -> None:
    """The trained tokens must decode to the content and end with the end-of-turn marker's token."""
    marker_ids = tokenizer.convert_tokens_to_ids([marker])
    if not ids or ids[-1] != marker_ids[0]:
        raise MaskError(f"{where}: assistant turn {turn}: end-of-turn token {marker!r} is not trained")
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if _WS.sub("", decoded) != _WS.sub("", content + marker):
        raise MaskError(
            f"{where}: assistant turn {turn}: trained tokens decode to {decoded[:80]!r}, "
            f"expected the turn's content {content[:60]!r} followed by {marker!r}"
        )


def turn_markers(tokenizer: Any) -> dict[str, str]:
    """The template's end-of-turn token and the text that opens a user turn, found by rendering a probe chat.

    Generation probes stop at ``end_of_turn`` and call a response non-compliant if it writes ``user_opener``.
    """
    probe = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi"}]
    where = "turn-marker probe"
    text = _render(tokenizer, probe, add_generation_prompt=False, where=where)
    _, _, marker = _assistant_span(tokenizer, probe, 1, text, where=where)
    prefix = _render(tokenizer, probe[:1], add_generation_prompt=False, where=where)
    # What precedes the user's text after any earlier turn (e.g. an injected system prompt) has ended.
    before = prefix[: prefix.find("Hello there")] if "Hello there" in prefix else ""
    opener = before.rsplit(marker, 1)[-1].strip()
    for token in (getattr(tokenizer, "bos_token", None) or "",):  # a bos is not part of a turn's opener
        if token and opener.startswith(token):
            opener = opener[len(token) :].strip()
    return {"end_of_turn": marker, "user_opener": opener}

"""Builtin offline data: pydoc prose and synthetic demo conversations behind `builtin:` URIs.

Everything here is generated from the standard library or from a seeded RNG, so
experiments and tests never need a network or a dataset hub.

Held-out split (how `generate_demo_heldout` is kept disjoint from training):
every demo exchange is an *instance* of a task (e.g. ``add`` with operands
{17, 42}); its canonical key (task + order-free operands) is hashed with
SHA-256 and instances whose hash falls in bucket 0 of `_HELDOUT_BUCKETS` are
reserved for held-out probes. `generate_demo_conversations` rejects those
instances in every turn and `generate_demo_heldout` accepts only them. Because
every prompt template embeds all operands, a prompt determines its instance, so
no held-out prompt can be a training user turn — for any seed, not only the
defaults. The split is by instance, not by wording, so probes measure
generalisation to unseen operands rather than to an unseen phrasing.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sftray.atomic import write_text_atomic

__all__ = [
    "BUILTINS",
    "Builtin",
    "builtin_help",
    "generate_demo_conversations",
    "generate_demo_heldout",
    "pydoc_topics_split",
    "pydoc_topics_text",
    "resolve_builtin",
]

HELDOUT_TOPIC_SHARE = 0.05
"""Share of the pydoc prose (characters, whole topics, the last in key order) that the builtin base never trains on
and the mix never mixes in: the forgetting measure's text (``builtin:pydoc_topics_heldout``)."""
_DEMO_TRAIN_SIZE = 2000
_DEMO_JSON_TRAIN_SIZE = 1000
_DEMO_TRAIN_SEED = 0
_DEMO_HELDOUT_SIZE = 200
_DEMO_HELDOUT_SEED = 0

# 1 in 10 task instances is reserved for held-out probes.
_HELDOUT_BUCKETS = 10
# Share of training conversations that open with a system message ("a few percent").
_SYSTEM_SHARE = 0.04

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer with the result only.",
    "You answer small puzzles correctly and briefly.",
)

# Short lowercase words (3-8 letters) for the string tasks; fixed so data is reproducible.
_WORD_TEXT = """
apple banana cherry grape lemon mango melon peach pear plum
river ocean lake stream valley mountain forest desert island meadow
house garden window door table chair kitchen bottle pencil paper
yellow purple orange silver golden green black white brown violet
tiger horse rabbit monkey donkey turtle parrot falcon badger otter
winter summer autumn spring morning evening night sunday monday friday
python ray model token vector matrix tensor layer kernel buffer
string number letter symbol record field object method class module
planet comet star galaxy rocket orbit moon meteor nebula quasar
music guitar piano violin drum flute trumpet cello banjo harp
bread butter cheese honey sugar salt pepper onion garlic carrot
doctor farmer pilot teacher writer painter baker sailor singer dancer
castle bridge tower temple palace harbor market school library museum
cloud storm thunder rain snow wind breeze frost shadow light
jacket shirt boots scarf gloves pocket button ribbon zipper collar
puzzle riddle secret signal anchor compass lantern mirror candle basket
"""
_WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


# ---------------------------------------------------------------------------
# pydoc prose


def pydoc_topics_text() -> str:
    """Return CPython's pydoc topic help (English prose, ~465 KB) in sorted-key order.

    Topics are separated by one blank line. The text ships with the standard
    library, so it is available offline; it is deterministic for a given
    Python version.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"


def pydoc_topics_split() -> tuple[str, str]:
    """(train, held-out) parts of ``pydoc_topics_text()``, whole topics each: the last topics in key order that make up
    ``HELDOUT_TOPIC_SHARE`` of the characters are held out, the rest is what the builtin base pretrains on.

    Whole documents, so no held-out text is a neighbour window of a trained one: forgetting measured on the held-out
    part is loss on prose the base has never seen, not on memorised text.
    """
    from pydoc_data.topics import topics

    bodies = [topics[key].strip("\n") for key in sorted(topics)]
    total, tail, cut = sum(len(b) for b in bodies), 0, len(bodies)
    while cut > 1 and tail < HELDOUT_TOPIC_SHARE * total:
        cut -= 1
        tail += len(bodies[cut])
    return "\n\n".join(bodies[:cut]) + "\n", "\n\n".join(bodies[cut:]) + "\n"


# ---------------------------------------------------------------------------
# demo task instances
#
# Each sampler returns (key, fields, answer): `key` is the canonical,
# order-free identity of the instance (used for the held-out split), `fields`
# fill the prompt templates, `answer` is the exact assistant reply.

_Instance = tuple[str, dict[str, str], str]


def _sample_add(rng: random.Random) -> _Instance:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add:{min(a, b)},{max(a, b)}", {"a": str(a), "b": str(b)}, str(a + b)


def _sample_reverse(rng: random.Random) -> _Instance:
    word = rng.choice(_WORDS)
    return f"reverse:{word}", {"w": word}, word[::-1]


def _sample_uppercase(rng: random.Random) -> _Instance:
    word = rng.choice(_WORDS)
    return f"uppercase:{word}", {"w": word}, word.upper()


def _sample_count(rng: random.Random) -> _Instance:
    word = rng.choice(_WORDS)
    # Mostly a letter of the word (non-zero counts); sometimes any letter so "0" occurs.
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"count:{letter}:{word}", {"c": letter, "w": word}, str(word.count(letter))


def _sample_sort(rng: random.Random) -> _Instance:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    shown = ", ".join(map(str, nums))
    ordered = ", ".join(map(str, sorted(nums)))
    return f"sort:{ordered}", {"xs": shown}, ordered


def _sample_larger(rng: random.Random) -> _Instance:
    a, b = rng.sample(range(1000), 2)  # distinct, so "larger" is well defined
    return f"larger:{min(a, b)},{max(a, b)}", {"a": str(a), "b": str(b)}, str(max(a, b))


# task -> (sampler, first-turn templates, follow-up templates). Every template
# embeds all fields, and numbers / quoted words are the only digits / quotes in
# it, so a prompt determines its instance (needed for the held-out guarantee).
_TASKS: dict[str, tuple[Callable[[random.Random], _Instance], tuple[str, ...], tuple[str, ...]]] = {
    "add": (
        _sample_add,
        (
            "What is {a} + {b}?",
            "Add {a} and {b}.",
            "Compute the sum of {a} and {b}.",
            "{a} plus {b} equals what?",
        ),
        ("Now add {a} and {b}.", "And {a} + {b}?", "What about {a} plus {b}?"),
    ),
    "reverse": (
        _sample_reverse,
        (
            "Reverse the word '{w}'.",
            "Write '{w}' backwards.",
            "What is '{w}' spelled in reverse?",
        ),
        ("Now reverse '{w}'.", "And backwards, '{w}'?"),
    ),
    "uppercase": (
        _sample_uppercase,
        (
            "Write '{w}' in uppercase.",
            "Convert '{w}' to capital letters.",
            "Uppercase the word '{w}'.",
        ),
        ("Now uppercase '{w}'.", "And '{w}' in capitals?"),
    ),
    "count": (
        _sample_count,
        (
            "How many times does the letter '{c}' appear in '{w}'?",
            "Count the letter '{c}' in the word '{w}'.",
            "In '{w}', how many '{c}' are there?",
        ),
        ("Now count '{c}' in '{w}'.", "And the letter '{c}' in '{w}'?"),
    ),
    "sort": (
        _sample_sort,
        (
            "Sort these numbers in ascending order: {xs}",
            "Put in increasing order: {xs}",
            "Order from smallest to largest: {xs}",
        ),
        ("Now sort: {xs}", "And these: {xs}"),
    ),
    "larger": (
        _sample_larger,
        (
            "Which is larger, {a} or {b}?",
            "What is the bigger number: {a} or {b}?",
            "Pick the maximum of {a} and {b}.",
        ),
        ("Now {a} or {b}?", "And between {a} and {b}?"),
    ),
}
DEMO_TASKS: tuple[str, ...] = tuple(_TASKS)


def _sample_subtract(rng: random.Random) -> _Instance:
    a, b = sorted(rng.sample(range(100), 2), reverse=True)
    return f"subtract:{a},{b}", {"a": str(a), "b": str(b)}, str(a - b)


def _sample_multiply(rng: random.Random) -> _Instance:
    a, b = rng.randint(2, 12), rng.randint(2, 99)
    return f"multiply:{min(a, b)},{max(a, b)}", {"a": str(a), "b": str(b)}, str(a * b)


def _sample_join(rng: random.Random) -> _Instance:
    v, w = rng.sample(_WORDS, 2)  # ordered: joining v and w is not joining w and v
    return f"join:{v},{w}", {"v": v, "w": w}, f"{v}-{w}"


def _sample_double(rng: random.Random) -> _Instance:
    a = rng.randint(0, 499)
    return f"double:{a}", {"a": str(a)}, str(2 * a)


# The second stage of the multi-stage demo (conf/stages/demo_two_stage.yaml): other tasks, and every answer in a
# new response format, JSON_FORMAT. Same rules as _TASKS (every template embeds all fields).
_JSON_TASKS: dict[str, tuple[Callable[[random.Random], _Instance], tuple[str, ...], tuple[str, ...]]] = {
    "subtract": (
        _sample_subtract,
        ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."),
        ("Now {a} minus {b}?", "And {a} - {b}?"),
    ),
    "multiply": (
        _sample_multiply,
        ("What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} x {b}."),
        ("Now {a} times {b}?", "And {a} x {b}?"),
    ),
    "join": (
        _sample_join,
        (
            "Join '{v}' and '{w}' with a hyphen.",
            "Hyphenate '{v}' and '{w}'.",
            "Write '{v}' then '{w}', joined by a dash.",
        ),
        ("Now join '{v}' and '{w}'.", "And '{v}' with '{w}'?"),
    ),
    "double": (
        _sample_double,
        ("What is twice {a}?", "Double the number {a}.", "Multiply {a} by two."),
        ("Now double {a}.", "And twice {a}?"),
    ),
}
JSON_FORMAT = '{{"result": "{answer}"}}'
"""The response format of the second demo stage: the answer inside a one-key JSON object."""
JSON_FORMAT_REGEX = r'\{"result": "[^"]*"\}'
"""What a compliant response of the second stage looks like (the probes' ``format``)."""


def _is_heldout(key: str) -> bool:
    # SHA-256 rather than hash(): stable across processes (no PYTHONHASHSEED dependence).
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _HELDOUT_BUCKETS == 0


def _draw(*, rng: random.Random, task: str, heldout: bool, tasks: dict = _TASKS) -> _Instance:
    """Rejection-sample an instance of `task` on the requested side of the split."""
    sampler = tasks[task][0]
    while True:
        inst = sampler(rng)
        if _is_heldout(inst[0]) == heldout:
            return inst


def generate_demo_conversations(
    n: int, *, seed: int, multi_turn_share: float = 0.25, tasks: dict | None = None, answer_format: str = "{answer}"
) -> list[dict]:
    """Return `n` seeded conversations `{"messages": [...], "task": str}` with verifiable answers.

    Tasks (uniform): add, reverse, uppercase, count, sort, larger. A share
    `multi_turn_share` of items has 2-3 user/assistant exchanges, all of the same
    task; about 4 % start with a system message. Held-out instances (see module
    docstring) never appear.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= multi_turn_share <= 1.0:
        raise ValueError(f"multi_turn_share must be in [0, 1], got {multi_turn_share}")
    tasks = tasks or _TASKS
    rng = random.Random(seed)
    out: list[dict] = []
    for _ in range(n):
        task = rng.choice(tuple(tasks))
        _, first_templates, follow_templates = tasks[task]
        turns = rng.randint(2, 3) if rng.random() < multi_turn_share else 1
        messages: list[dict[str, str]] = []
        if rng.random() < _SYSTEM_SHARE:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        for turn in range(turns):
            _, fields, answer = _draw(rng=rng, task=task, heldout=False, tasks=tasks)
            template = rng.choice(first_templates if turn == 0 else follow_templates)
            messages.append({"role": "user", "content": template.format(**fields)})
            messages.append({"role": "assistant", "content": answer_format.format(answer=answer)})
        out.append({"messages": messages, "task": task})
    return out


def generate_demo_heldout(
    n: int, *, seed: int, tasks: dict | None = None, answer_format: str = "{answer}", format_regex: str | None = None
) -> list[dict]:
    """Return `n` distinct held-out probes `{"prompt", "reference", "task"}`.

    Prompts use the first-turn templates over held-out instances only, so they
    never occur as a user turn of `generate_demo_conversations` (any seed).
    Tasks cycle in a fixed order so every task is equally represented.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tasks = tasks or _TASKS
    names = tuple(tasks)
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        # The held-out prompt space is finite (a few thousand), so cap the retries.
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct held-out probes")
        task = names[len(out) % len(names)]
        _, fields, answer = _draw(rng=rng, task=task, heldout=True, tasks=tasks)
        prompt = rng.choice(tasks[task][1]).format(**fields)
        if prompt in seen:
            continue
        seen.add(prompt)
        probe = {"prompt": prompt, "reference": answer_format.format(answer=answer), "task": task}
        out.append(probe | ({"format": format_regex} if format_regex else {}))
    return out


# ---------------------------------------------------------------------------
# builtin: URIs


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


@dataclass(frozen=True)
class Builtin:
    """One ``builtin:<name>`` dataset: the file it is written to under ``cache_dir/"builtin"``, how its text is made,
    and one line saying what it holds."""

    file: str
    text: Callable[[], str]
    about: str


def _demo_json_train() -> str:
    rows = generate_demo_conversations(
        _DEMO_JSON_TRAIN_SIZE, seed=_DEMO_TRAIN_SEED, tasks=_JSON_TASKS, answer_format=JSON_FORMAT
    )
    return _jsonl(rows)


def _demo_json_heldout() -> str:
    rows = generate_demo_heldout(
        _DEMO_HELDOUT_SIZE,
        seed=_DEMO_HELDOUT_SEED,
        tasks=_JSON_TASKS,
        answer_format=JSON_FORMAT,
        format_regex=JSON_FORMAT_REGEX,
    )
    return _jsonl(rows)


BUILTINS: dict[str, Builtin] = {
    "demo": Builtin(
        "demo-train.jsonl",
        lambda: _jsonl(generate_demo_conversations(_DEMO_TRAIN_SIZE, seed=_DEMO_TRAIN_SEED)),
        f"{_DEMO_TRAIN_SIZE} demo conversations (seed {_DEMO_TRAIN_SEED})",
    ),
    "demo-heldout": Builtin(
        "demo-heldout.jsonl",
        lambda: _jsonl(generate_demo_heldout(_DEMO_HELDOUT_SIZE, seed=_DEMO_HELDOUT_SEED)),
        f"{_DEMO_HELDOUT_SIZE} held-out demo probes (seed {_DEMO_HELDOUT_SEED})",
    ),
    "demo-json": Builtin(
        "demo-json-train.jsonl",
        _demo_json_train,
        f"the second demo stage's {_DEMO_JSON_TRAIN_SIZE} conversations (subtract, double, multiply, join; answers "
        "as JSON)",
    ),
    "demo-json-heldout": Builtin(
        "demo-json-heldout.jsonl",
        _demo_json_heldout,
        f"the second demo stage's {_DEMO_HELDOUT_SIZE} probes, each with the format a compliant answer matches",
    ),
    "pydoc_topics": Builtin(
        "pydoc_topics_train.txt",
        lambda: pydoc_topics_split()[0],
        "the pydoc prose the builtin base trains on",
    ),
    "pydoc_topics_heldout": Builtin(
        "pydoc_topics_heldout.txt",
        lambda: pydoc_topics_split()[1],
        "the pydoc prose it never sees (the last topics; pydoc_topics_split)",
    ),
}
"""Every ``builtin:<name>`` dataset by name: the one list to extend when adding one."""


def builtin_help() -> str:
    """One line per builtin dataset: ``builtin:<name>  what it holds``."""
    width = max(len(name) for name in BUILTINS) + len("builtin:")
    return "\n".join(f"{'builtin:' + name:<{width}}  {b.about}" for name, b in BUILTINS.items())


def resolve_builtin(uri: str, cache_dir: Path) -> Path:
    """Materialise a `builtin:<name>` dataset (``BUILTINS``) under `cache_dir/"builtin"` and return its path.

    Existing files are reused; writes are atomic, so concurrent callers are safe.
    """
    prefix = "builtin:"
    name = uri[len(prefix) :] if uri.startswith(prefix) else None
    if name not in BUILTINS:
        valid = ", ".join(prefix + key for key in BUILTINS)
        raise ValueError(f"unknown builtin dataset {uri!r}; valid names: {valid}")
    path = Path(cache_dir) / "builtin" / BUILTINS[name].file
    if path.exists():
        return path
    write_text_atomic(path, BUILTINS[name].text())
    return path

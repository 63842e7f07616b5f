"""Tests for sftray.data.builtin: pydoc prose, demo conversations, held-out probes, builtin: URIs."""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from sftray.data.builtin import (
    BUILTINS,
    builtin_help,
    generate_demo_conversations,
    generate_demo_heldout,
    pydoc_topics_split,
    pydoc_topics_text,
    resolve_builtin,
)

EXPECTED_TASKS = {"add", "reverse", "uppercase", "count", "sort", "larger"}


def expected_answer(*, task: str, prompt: str) -> str:
    """Independently recompute the answer of a demo prompt from its text."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    quoted = re.findall(r"'([^']*)'", prompt)
    if task == "add":
        assert len(numbers) == 2, prompt
        return str(sum(numbers))
    if task == "reverse":
        assert len(quoted) == 1, prompt
        return quoted[0][::-1]
    if task == "uppercase":
        assert len(quoted) == 1, prompt
        return quoted[0].upper()
    if task == "count":
        assert len(quoted) == 2, prompt
        letter = next(q for q in quoted if len(q) == 1)
        word = next(q for q in quoted if len(q) > 1)
        return str(word.count(letter))
    if task == "sort":
        assert 3 <= len(numbers) <= 5, prompt
        return ", ".join(str(x) for x in sorted(numbers))
    if task == "larger":
        assert len(numbers) == 2 and numbers[0] != numbers[1], prompt
        return str(max(numbers))
    raise AssertionError(f"unexpected task {task!r}")


def exchanges(conv: dict) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a conversation, checking the role layout on the way."""
    msgs = conv["messages"]
    if msgs[0]["role"] == "system":
        msgs = msgs[1:]
    assert len(msgs) % 2 == 0 and msgs
    roles = [m["role"] for m in msgs]
    assert roles == ["user", "assistant"] * (len(msgs) // 2)
    return [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]


def template_shape(prompt: str) -> str:
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'W'", prompt))


# --- pydoc -----------------------------------------------------------------


def test_pydoc_split_holds_out_whole_topics_the_base_never_trains_on():
    from pydoc_data.topics import topics

    from sftray.data.builtin import HELDOUT_TOPIC_SHARE

    train, heldout = pydoc_topics_split()
    bodies = [topics[k].strip("\n") for k in sorted(topics)]
    in_train = [b for b in bodies if b in train]
    in_heldout = [b for b in bodies if b in heldout]
    # every topic is on exactly one side, whole; the held-out side is the last topics, at least the stated share
    assert len(in_train) + len(in_heldout) == len(bodies) and in_heldout == bodies[len(in_train) :]
    assert not any(b in train for b in in_heldout) and not any(b in heldout for b in in_train)
    assert HELDOUT_TOPIC_SHARE <= len(heldout) / (len(train) + len(heldout)) < 2 * HELDOUT_TOPIC_SHARE


def test_pydoc_topics_text_is_sorted_topics_joined():
    from pydoc_data.topics import topics

    text = pydoc_topics_text()
    assert text == pydoc_topics_text()
    assert len(text) > 300_000
    bodies = [topics[k].strip("\n") for k in sorted(topics)]
    # Each topic appears in sorted-key order, separated from the next by exactly one blank line.
    pos = 0
    for i, body in enumerate(bodies):
        start = text.index(body, pos)
        if i:
            assert text[pos:start] == "\n\n"
        else:
            assert start == 0
        pos = start + len(body)
    assert text[pos:] == "\n"


# --- demo conversations ------------------------------------------------------


def test_demo_conversations_deterministic_by_seed():
    a = generate_demo_conversations(300, seed=7)
    b = generate_demo_conversations(300, seed=7)
    c = generate_demo_conversations(300, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 300


def test_demo_answers_are_correct_and_all_tasks_present():
    convs = generate_demo_conversations(2000, seed=0)
    assert {c["task"] for c in convs} == EXPECTED_TASKS
    counts = Counter(c["task"] for c in convs)
    assert min(counts.values()) > 2000 / len(EXPECTED_TASKS) * 0.7  # roughly uniform
    for conv in convs:
        assert set(conv) == {"messages", "task"}
        for user, assistant in exchanges(conv):
            assert assistant == expected_answer(task=conv["task"], prompt=user), conv
            assert len(assistant) <= 30  # answers are short


def test_demo_prompts_vary_per_task():
    convs = generate_demo_conversations(2000, seed=0)
    shapes: dict[str, set[str]] = {}
    for conv in convs:
        shapes.setdefault(conv["task"], set()).update(template_shape(u) for u, _ in exchanges(conv))
    for task, s in shapes.items():
        assert len(s) >= 3, (task, s)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.6, 1.0])
def test_multi_turn_share(share):
    convs = generate_demo_conversations(2000, seed=3, multi_turn_share=share)
    n_turns = [len(exchanges(c)) for c in convs]
    assert set(n_turns) <= {1, 2, 3}
    multi = [n for n in n_turns if n > 1]
    assert abs(len(multi) / len(convs) - share) < 0.04
    if share >= 0.25:
        assert set(multi) == {2, 3}


def test_system_messages_are_rare_and_first():
    convs = generate_demo_conversations(2000, seed=0)
    with_system = [c for c in convs if c["messages"][0]["role"] == "system"]
    assert 0.01 < len(with_system) / len(convs) < 0.10
    for conv in convs:
        assert all(m["role"] != "system" for m in conv["messages"][1:])
        assert all(isinstance(m["content"], str) and m["content"] for m in conv["messages"])


def test_demo_rejects_bad_arguments():
    with pytest.raises(ValueError):
        generate_demo_conversations(3, seed=0, multi_turn_share=1.5)
    with pytest.raises(ValueError):
        generate_demo_conversations(-1, seed=0)


# --- held-out ----------------------------------------------------------------


def test_heldout_probes_correct_distinct_and_deterministic():
    probes = generate_demo_heldout(200, seed=0)
    assert probes == generate_demo_heldout(200, seed=0)
    assert probes != generate_demo_heldout(200, seed=1)
    assert len(probes) == 200
    assert len({p["prompt"] for p in probes}) == 200
    assert {p["task"] for p in probes} == EXPECTED_TASKS
    for p in probes:
        assert set(p) == {"prompt", "reference", "task"}
        assert p["reference"] == expected_answer(task=p["task"], prompt=p["prompt"])


def test_heldout_prompts_never_train_user_turns():
    train_users = {
        user
        for seed in (0, 1, 12345)
        for conv in generate_demo_conversations(5000, seed=seed, multi_turn_share=0.5)
        for user, _ in exchanges(conv)
    }
    probes = generate_demo_heldout(200, seed=0) + generate_demo_heldout(200, seed=5)
    assert not {p["prompt"] for p in probes} & train_users

    # Stronger: the split is by instance, so no held-out operands appear in training
    # under any wording (compare template-independent keys).
    def key(task: str, prompt: str) -> tuple:
        nums = sorted(re.findall(r"\d+", prompt), key=int)
        return (task, tuple(nums), tuple(sorted(re.findall(r"'([^']*)'", prompt))))

    train_keys = {
        key(conv["task"], user)
        for conv in generate_demo_conversations(5000, seed=0, multi_turn_share=0.5)
        for user, _ in exchanges(conv)
    }
    assert not {key(p["task"], p["prompt"]) for p in probes} & train_keys


# --- resolve_builtin -----------------------------------------------------------


def test_resolve_builtin_writes_files(tmp_path):
    demo = resolve_builtin("builtin:demo", tmp_path)
    assert demo == tmp_path / "builtin" / "demo-train.jsonl"
    rows = [json.loads(line) for line in demo.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2000
    assert rows == generate_demo_conversations(2000, seed=0)

    heldout = resolve_builtin("builtin:demo-heldout", tmp_path)
    assert heldout.name == "demo-heldout.jsonl"
    probes = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines()]
    assert probes == generate_demo_heldout(200, seed=0)

    pydoc = resolve_builtin("builtin:pydoc_topics", tmp_path)
    assert pydoc.name == "pydoc_topics_train.txt"
    assert pydoc.read_text(encoding="utf-8") == pydoc_topics_split()[0]
    pydoc_heldout = resolve_builtin("builtin:pydoc_topics_heldout", tmp_path)
    assert pydoc_heldout.name == "pydoc_topics_heldout.txt"
    assert pydoc_heldout.read_text(encoding="utf-8") == pydoc_topics_split()[1]

    # No temp files left behind.
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == [
        "demo-heldout.jsonl",
        "demo-train.jsonl",
        "pydoc_topics_heldout.txt",
        "pydoc_topics_train.txt",
    ]


def test_resolve_builtin_reuses_existing_file(tmp_path):
    path = resolve_builtin("builtin:demo-heldout", tmp_path)
    path.write_text("sentinel\n", encoding="utf-8")  # a rewrite would clobber this
    assert resolve_builtin("builtin:demo-heldout", tmp_path) == path
    assert path.read_text(encoding="utf-8") == "sentinel\n"


def test_resolve_builtin_concurrent_callers(tmp_path):
    # Futures re-raise worker exceptions in .result(), so failures surface here.
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(resolve_builtin, "builtin:demo", tmp_path) for _ in range(4)]
        results = [f.result() for f in futures]
    assert len(set(results)) == 1
    assert len(results[0].read_text(encoding="utf-8").splitlines()) == 2000
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == ["demo-train.jsonl"]


def test_every_registered_builtin_is_written_named_and_described(tmp_path):
    """The registry is the one list: every entry resolves to its own file, the help and the error name it."""
    help_lines = builtin_help().splitlines()
    assert len(help_lines) == len(BUILTINS)
    for (name, entry), line in zip(BUILTINS.items(), help_lines):
        assert resolve_builtin(f"builtin:{name}", tmp_path).name == entry.file
        assert line.split()[0] == f"builtin:{name}" and entry.about in line
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == sorted(e.file for e in BUILTINS.values())
    with pytest.raises(ValueError, match="valid names: " + ", ".join(f"builtin:{n}" for n in BUILTINS)):
        resolve_builtin("builtin:nope", tmp_path)


@pytest.mark.parametrize("uri", ["builtin:nope", "demo", "file:demo", "builtin:"])
def test_resolve_builtin_rejects_unknown(tmp_path, uri):
    with pytest.raises(ValueError) as info:
        resolve_builtin(uri, tmp_path)
    message = str(info.value)
    for name in ("builtin:demo", "builtin:demo-heldout", "builtin:pydoc_topics", "builtin:pydoc_topics_heldout"):
        assert name in message
    assert not (tmp_path / "builtin").exists()


# --- the second demo stage (builtin:demo-json) ---------------------------------


def _json_answer(task: str, prompt: str) -> str:
    """Independently recompute a demo-json answer from its prompt, in the stage's JSON format."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    quoted = re.findall(r"'([^']*)'", prompt)
    value = {
        "subtract": lambda: str(numbers[0] - numbers[1]) if "from" not in prompt else str(numbers[1] - numbers[0]),
        "double": lambda: str(2 * numbers[0]),
        "multiply": lambda: str(numbers[0] * numbers[1]),
        "join": lambda: f"{quoted[0]}-{quoted[1]}",
    }[task]()
    return json.dumps({"result": value})


def test_the_json_stage_teaches_other_tasks_in_a_new_format_on_operands_its_probes_never_show(tmp_path):
    rows = [json.loads(line) for line in resolve_builtin("builtin:demo-json", tmp_path).read_text().splitlines()]
    probes = [
        json.loads(line) for line in resolve_builtin("builtin:demo-json-heldout", tmp_path).read_text().splitlines()
    ]
    assert len(rows) == 1000 and len(probes) == 200 and len({p["prompt"] for p in probes}) == 200
    assert {r["task"] for r in rows} == {p["task"] for p in probes} == {"subtract", "double", "multiply", "join"}
    assert not {r["task"] for r in rows} & EXPECTED_TASKS  # other tasks than the first stage's
    for conv in rows:
        for user, answer in exchanges(conv):
            assert answer == _json_answer(conv["task"], user), (user, answer)
    for p in probes:
        assert p["reference"] == _json_answer(p["task"], p["prompt"])
        assert re.fullmatch(p["format"], p["reference"])  # the format a compliant answer must match
        assert not re.fullmatch(p["format"], p["reference"].removeprefix('{"result": ').removesuffix("}"))
    assert not {p["prompt"] for p in probes} & {user for conv in rows for user, _ in exchanges(conv)}

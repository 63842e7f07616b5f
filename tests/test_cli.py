"""The ``sftray`` command in-process through its console-script entry point (help, config, preview; no Ray),
and ``sftray.preview.render_example``."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from testkit import write_jsonl
from transformers import AutoTokenizer

from sftray.config import SourceConfig, schema_keys
from sftray.data.chat import encode_chat
from sftray.preview import MASKED_TTY, RESET, TRAINED_TTY, render_example

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

TRAINED = re.compile(r"\{\+(.*?)\+\}", re.S)


pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture(scope="module")
def tok(cli_cache: Path) -> Any:
    return AutoTokenizer.from_pretrained(cli_cache / "tiny-llama")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def trained(out: str) -> list[str]:
    """Texts inside {+ +} markers, after the header line (whose legend shows the markers)."""
    return TRAINED.findall(out.split("\n", 1)[1])


def examples(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("--- ")]


# --- help, unknown command, flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"], []])
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 0
    assert out.startswith("usage: sftray COMMAND [key=value ...] [flags]")
    for command in ("prep", "preview", "train", "sweep", "pretrain", "config"):
        assert re.search(rf"^  {command} +\S", out, re.M), command
    assert err == ""


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "trian")
    assert code == 2
    assert out == ""
    assert err.startswith("unknown command 'trian'\n\nusage: sftray COMMAND")


def test_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "preview", "--force")
    assert code == 1
    assert err == "error: unknown flag(s) --force; valid: none\n"
    code, _, err = run(capsys, "prep", "--forse")  # fails before Ray starts
    assert code == 1
    assert err == "error: unknown flag(s) --forse; valid: --force\n"


COMMANDS = ("prep", "preview", "pretrain", "train", "sweep", "config")


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(capsys: pytest.CaptureFixture[str], command: str, flag: str) -> None:
    """``sftray COMMAND --help`` prints that command's help (its flags, common overrides, where the keys are listed),
    without composing the config or starting anything; ``sftray help COMMAND`` is the same."""
    code, out, err = run(capsys, command, flag)
    assert (code, err) == (0, "")
    assert out.startswith(f"usage: sftray {command} ")
    assert "sftray config" in out  # where every key and its current value are shown
    assert run(capsys, "help", command) == (0, out, "")
    assert run(capsys, command, "data.max_seq_len=128", flag) == (0, out, "")  # help wins over overrides


def test_command_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "prep", "--help")[1]
    assert "--force" in out
    assert "data.sources=" in out
    out = run(capsys, "pretrain", "--help")[1]
    assert "steps=" in out and "--force" in out
    out = run(capsys, "preview", "-h")[1]
    assert "n=" in out and "--force" not in out


def test_help_of_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "help", "trian")
    assert (code, out) == (2, "")
    assert err.startswith("unknown command 'trian'\n\nusage: sftray COMMAND")


# --- pretrain, make clean -----------------------------------------------------------------------------------------


@pytest.mark.slow  # two builds of a few pretraining steps each (seconds per step on 2 busy CPUs)
def test_pretrain_steps_for_a_quick_look(capsys: pytest.CaptureFixture[str], tmp_path: Path, cli_cache: Path) -> None:
    """``sftray pretrain steps=N`` builds a quick base; a cached base of another size is rebuilt only with --force."""
    cache = tmp_path / "cache"
    shutil.copytree(cli_cache / "tiny-llama", cache / "tiny-llama")  # the tokenizer: no BPE training here
    code, out, err = run(capsys, "pretrain", "steps=1", f"paths.cache_dir={cache}")
    assert code == 0, err
    assert "  1 steps, " in out
    assert json.loads((cache / "tiny-llama-base-v2" / "pretrain_report.json").read_text())["steps"] == 1
    code, out, err = run(capsys, "pretrain", "steps=2", f"paths.cache_dir={cache}")
    assert (code, out) == (1, "")
    assert "built with 1 steps" in err and "--force" in err
    code, out, err = run(capsys, "pretrain", "steps=2", "--force", f"paths.cache_dir={cache}")
    assert code == 0, err
    assert "  2 steps, " in out
    assert run(capsys, "pretrain", "steps=0", f"paths.cache_dir={cache}")[2] == "error: steps=0 must be >= 1\n"


def test_make_clean_removes_the_configured_output_dir(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["make", "-n", "-C", str(root), "clean", f"SFTRAY_OUTPUT={tmp_path / 'elsewhere'}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"rm -rf {tmp_path / 'elsewhere'} " in out


# --- config ------------------------------------------------------------------------------------------------------


def test_config_prints_composed_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path, cli_cache: Path) -> None:
    code, out, err = run(capsys, "config", "data.max_seq_len=128")
    assert code == 0
    assert "\n  max_seq_len: 128\n" in out
    doc = yaml.safe_load(out)
    assert doc["data"]["max_seq_len"] == 128
    assert doc["data"]["sources"] == [dataclasses.asdict(SourceConfig(path="builtin:demo"))]  # every field shown
    assert doc["paths"] == {"output_dir": str(tmp_path / "outputs"), "cache_dir": str(cli_cache)}
    assert {"seed", "model", "data", "mix", "paths"} <= set(doc)


def test_config_typo_lists_valid_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "config", "data.max_seqlen=3")
    assert code == 1
    assert out == ""
    assert err.startswith("error: unknown config key 'data.max_seqlen'. Valid keys of data: name, sources,")
    for key in ("max_seq_len", "packing", "train_on", "overlength"):
        assert key in err


def test_config_invalid_value(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "config", "data.on_error=ignore")
    assert code == 1
    assert err == "error: data.on_error='ignore' is not valid; choose one of: raise, drop\n"


@pytest.mark.parametrize(
    ("override", "where"),
    [("train.lrr=1e-4", "train"), ("train.lora.rr=4", "train.lora"), ("sweep.lr.lo=1", "sweep.lr"), ("sed=1", "")],
)
@pytest.mark.parametrize("plus", ["+", "++"])
def test_config_added_unknown_key_fails_like_a_typo(
    capsys: pytest.CaptureFixture[str], override: str, where: str, plus: str
) -> None:
    """Hydra's + / ++ add keys; outside an open mapping (sweep.params) an added key is a typo, not a new knob."""
    code, out, err = run(capsys, "config", plus + override)
    assert (code, out) == (1, "")
    key = override.split("=")[0]
    valid = ", ".join(schema_keys(where))
    assert err == f"error: unknown config key '{key}'. Valid keys of {where or 'the root'}: {valid}\n"
    assert run(capsys, "config", override)[2] == err  # exactly what the key gets without +


@pytest.mark.parametrize(
    "overrides",
    [
        ["+sweep.params.train.lora.r=[8,16]", "++sweep.params.mix.ratio=[0.05,0.1]"],
        ["+sweep.params={train.lora.r:[8,16],mix.ratio:[0.05,0.1]}"],
        ["+sweep.params={train.lora.r:[8,16]}", "+sweep.params={mix.ratio:[0.05,0.1]}"],
    ],
)
def test_config_sweep_params_is_an_open_mapping(capsys: pytest.CaptureFixture[str], overrides: list[str]) -> None:
    code, out, err = run(capsys, "config", *overrides)
    assert (code, err) == (0, "")
    assert yaml.safe_load(out)["sweep"]["params"] == {"train.lora.r": [8, 16], "mix.ratio": [0.05, 0.1]}


@pytest.mark.parametrize("key", ["data.sources", "data.val_sources", "mix.sources", "mix.heldout_sources"])
def test_config_source_list_takes_a_single_path(capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str) -> None:
    """``data.sources=/x.jsonl`` means one source with that path (as ``[{path: /x.jsonl}]`` does)."""
    f = write_jsonl(tmp_path / "one.jsonl", _chat_rows("messages"))
    group, name = key.split(".")
    code, out, err = run(capsys, "config", f"{key}={f}")
    assert (code, err) == (0, "")
    assert yaml.safe_load(out)[group][name] == [dataclasses.asdict(SourceConfig(path=str(f)))]
    long = run(capsys, "config", f"{key}=[{{path:'{f}'}}]")
    assert long == (0, out, "")
    if key == "data.sources":
        assert run(capsys, "config", "data=files", f"{key}={f}")[0] == 0  # the group that demands sources
        code, out, err = run(capsys, "config", f"{key}=builtin:demo")
        assert yaml.safe_load(out)[group][name][0]["path"] == "builtin:demo"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_failures=-5", "train.max_failures=-5 must be >= -1"),
        ("train.lora.r=0", "train.lora.r=0 must be >= 1"),
        ("eval.forgetting_budget=-1", "eval.forgetting_budget=-1.0 must be >= 0"),
    ],
)
def test_config_out_of_range_value(capsys: pytest.CaptureFixture[str], override: str, message: str) -> None:
    assert run(capsys, "config", override) == (1, "", f"error: {message}\n")


# --- preview ------------------------------------------------------------------------------------------------------


def test_preview_demo_plain(capsys: pytest.CaptureFixture[str], cli_cache: Path) -> None:
    code, out, err = run(capsys, "preview", "n=2")
    assert code == 0
    assert out.startswith("preview of builtin:demo (messages); trained tokens inside {+ +}\n")
    assert "\x1b[" not in out  # capsys is not a TTY: plain markers
    heads = examples(out)
    demo = cli_cache / "builtin" / "demo-train.jsonl"
    assert [h.split(": ")[0] for h in heads] == [f"--- {demo}:1", f"--- {demo}:2"]
    for h in heads:
        assert re.fullmatch(r"--- .*:\d: \d+ tokens, \d+ trained", h), h
    spans = trained(out)
    assert len(spans) >= 2
    assert all(s.endswith("<|im_end|>") for s in spans), spans
    # trained text is assistant content only: the assistant header is outside the markers
    assert out.count("<|im_start|>assistant\n{+") == len(spans)


def test_preview_default_count(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "preview")
    assert code == 0
    assert len(examples(out)) == 5


def _chat_rows(fmt: str) -> list[dict]:
    if fmt == "messages":
        return [
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in (1, 2)
        ]
    if fmt == "sharegpt":
        return [
            {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in (1, 2)
        ]
    if fmt == "alpaca":
        return [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in (1, 2)]
    return [{"prompt": f"q{i}", "completion": f"a{i}"} for i in (1, 2)]


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion"])
def test_preview_user_file_each_format(capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str) -> None:
    f = write_jsonl(tmp_path / f"{fmt}.jsonl", _chat_rows(fmt))
    code, out, err = run(capsys, "preview", "data=files", f"data.sources=[{{path:{f}}}]", "n=5")
    assert (code, err) == (0, "")
    assert out.startswith(f"preview of {f} ({fmt}); trained tokens inside {{+ +}}\n")
    assert [h.split(": ")[0] for h in examples(out)] == [f"--- {f}:1", f"--- {f}:2"]
    assert trained(out) == ["a1<|im_end|>", "a2<|im_end|>"]
    assert "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n{+a1<|im_end|>+}\n" in out


def test_preview_source_from_env(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write_jsonl(tmp_path / "chats.jsonl", _chat_rows("sharegpt"))
    monkeypatch.setenv("SFTRAY_DATA", str(f))
    code, out, _ = run(capsys, "preview", "data=files", "data.system_prompt=Be brief.", "n=1")
    assert code == 0
    assert len(examples(out)) == 1
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq1<|im_end|>" in out
    assert trained(out) == ["a1<|im_end|>"]


def test_preview_bad_lines_show_error_and_continue(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rows = _chat_rows("messages")
    bad_role = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    f = write_jsonl(tmp_path / "mixed.jsonl", [rows[0], "{not json", bad_role, "", rows[1]])
    code, out, err = run(capsys, "preview", "data=files", f"data.sources=[{{path:{f}}}]", "n=10")
    assert (code, err) == (0, "")
    heads = examples(out)
    assert [h.split(": ")[0] for h in heads] == [f"--- {f}:{n}" for n in (1, 2, 3, 5)]
    assert heads[1] == (
        f"--- {f}:2: ERROR (invalid_json): {f}:2: not valid JSON "
        "(Expecting property name enclosed in double quotes at column 2)"
    )
    assert heads[2] == (
        f"--- {f}:3: ERROR (unknown_role): {f}:3: message 0 has unknown role 'bot'; "
        "valid roles: system, user, assistant"
    )
    assert re.fullmatch(r"--- .*:5: \d+ tokens, \d+ trained", heads[3])
    assert trained(out) == ["a1<|im_end|>", "a2<|im_end|>"]


def test_preview_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    code, out, err = run(capsys, "preview", "data=files", f"data.sources=[{{path:{missing}}}]")
    assert code == 1
    assert err == f"error: data.sources[0]: no such file or folder: {str(missing)!r} (cwd: {tmp_path})\n"


# --- render_example -------------------------------------------------------------------------------------------------


def test_render_example_plain_and_color(tok: Any) -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    enc = encode_chat(messages, tok)
    prompt = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    plain = render_example(enc["input_ids"], enc["labels"], tok, color=False)
    assert plain == prompt + "{+a<|im_end|>+}\n"
    colored = render_example(enc["input_ids"], enc["labels"], tok, color=True)
    assert colored == f"{MASKED_TTY}{prompt}{RESET}{TRAINED_TTY}a<|im_end|>{RESET}{MASKED_TTY}\n{RESET}"
    assert re.sub(r"\x1b\[[\d;]*m", "", colored) == prompt + "a<|im_end|>\n"  # the same text, styled: no markers
    assert TRAINED_TTY != MASKED_TTY  # trained and masked tokens look different
    assert "{+" not in colored

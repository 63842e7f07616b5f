"""The docs cannot drift from the code: every command README.md and docs/*.md show, and every link between them.

Every line of a fenced code block that runs ``make TARGET ...`` or ``sftray COMMAND ...`` (``\\`` continuations
joined) is one test, named ``file:line``:

- ``make``: the target is a rule of the Makefile and ``make help`` lists it; every ``VAR=value`` it passes is a
  variable the Makefile reads; ``make -n`` (a dry run, the venv stamp assumed fresh) expands the line through the
  real Makefile, and each ``sftray`` command it would run (``jobs/submit.py ... -- ARGS`` runs ``sftray sweep``) is
  checked as below.
- ``sftray``: the command is one ``sftray --help`` lists; its flags and own options (``n=``, ``steps=``) are ones
  ``sftray COMMAND --help`` lists; the Hydra overrides compose into a config through ``sftray config OVERRIDES``,
  the real composition, which starts no Ray (asserted). ``--help`` lines run as they are.

A ``<name>`` in a line is a placeholder the reader fills in (``outputs/runs/<run>/epoch_02``): it is read as
``name`` (Hydra's grammar has no ``<``), so the rest of the line is still checked. A command line whose shell comment starts with ``placeholder`` (``sftray train stages=/path/to/my.yaml  #
placeholder: your stages file``) is not composed: it names a file only the reader has. Keep such lines few.

The CLI runs through its console-script entry point, as the shell runs it (never an import of ``sftray.cli``).
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

main = entry_points(group="console_scripts")["sftray"].load()  # the `sftray` command, as the shell runs it

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STAMP = ".venv/.installed"  # the Makefile's venv stamp: assumed fresh, so `make -n` shows only the command itself
PLACEHOLDER = re.compile(r"#\s*placeholder\b")
PLACEHOLDER_NAME = re.compile(r"<([\w-]+)>")
FENCE = re.compile(r"^\s*(```|~~~)")
COMMAND = re.compile(r"^\s*(?:\$\s+)?(make|sftray)\s")


@dataclass(frozen=True)
class DocLine:
    """One command line of a fenced code block: where it is and its text (continuations joined)."""

    path: Path
    lineno: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.lineno}"


def command_lines(path: Path) -> list[DocLine]:
    """The ``make`` / ``sftray`` lines of the fenced code blocks of one markdown file."""
    found: list[DocLine] = []
    lines = path.read_text().splitlines()
    inside, i = False, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        i += 1
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside or not COMMAND.match(line):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        found.append(DocLine(path, start, line.strip().removeprefix("$").strip()))
    return found


ALL_LINES = [line for doc in DOCS for line in command_lines(doc)]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def help_section(text: str, title: str) -> list[str]:
    """The indented lines under ``title:`` in a help text, up to the next blank or unindented line."""
    lines = text.splitlines()
    if f"{title}:" not in lines:
        return []
    body = []
    for line in lines[lines.index(f"{title}:") + 1 :]:
        if not line.startswith("  "):
            break
        body.append(line.strip())
    return body


@functools.cache
def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z_][\w-]*):(?!=)", (ROOT / "Makefile").read_text(), re.M))


@functools.cache
def make_help_targets() -> set[str]:
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()}


@functools.cache
def makefile_variables() -> set[str]:
    """Variables the Makefile reads: ``$(VAR)`` anywhere, ``VAR ?=`` defaults."""
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"\$[({](\w+)[)}]", text)) | set(re.findall(r"^(\w+)\s*\?=", text, re.M))


def sftray_commands_from_make(tokens: list[str]) -> list[list[str]]:
    """The sftray argv each command ``make -n`` would run holds (``jobs/submit.py ... -- ARGS``: ``sweep ARGS``)."""
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", STAMP, *tokens], cwd=ROOT, capture_output=True, text=True
    )
    assert dry.returncode == 0, f"make -n {shlex.join(tokens)} failed:\n{dry.stderr}"
    commands = []
    for line in dry.stdout.splitlines():
        if "/bin/sftray " not in line and "jobs/submit.py" not in line:
            continue
        words = shlex.split(line)
        if any(w.endswith("/bin/sftray") for w in words):
            commands.append(words[[w.endswith("/bin/sftray") for w in words].index(True) + 1 :])
        elif any(w.endswith("jobs/submit.py") for w in words):
            commands.append(["sweep", *(words[words.index("--") + 1 :] if "--" in words else [])])
    return commands


def check_sftray(capsys: pytest.CaptureFixture[str], argv: list[str], where: str) -> None:
    """The command is known, its flags and options are its own, and its overrides compose (no Ray started)."""
    if not argv or argv[0] == "help" or "--help" in argv or "-h" in argv:
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, f"{where}: sftray {shlex.join(argv)} failed: {err}"
        return
    command, rest = argv[0], argv[1:]
    _, usage, _ = run_cli(capsys, "--help")
    commands = [line.split()[0] for line in help_section(usage, "commands")]
    assert command in commands, f"{where}: `sftray {command}` is not a command; sftray --help lists {commands}"
    _, command_help, _ = run_cli(capsys, command, "--help")
    flags = {line.split()[0] for line in help_section(command_help, "flags")}
    options = {line.split("=")[0] for line in help_section(command_help, "options")}
    bad_flags = [a for a in rest if a.startswith("--") and a not in flags]
    assert not bad_flags, f"{where}: sftray {command} has no flag {bad_flags}; its flags: {sorted(flags)}"
    overrides = [a for a in rest if not a.startswith("--") and a.split("=")[0] not in options]
    code, _, err = run_cli(capsys, "config", *overrides)
    assert code == 0, f"{where}: the overrides of `sftray {shlex.join(argv)}` do not compose:\n{err}"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFTRAY_CACHE", str(tmp_path / "cache"))
    for var in ("SFTRAY_DATA", "SFTRAY_CONF", "SFTRAY_OUTPUT", "RAY_ADDRESS", "MAKEFLAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)  # relative paths in the docs are relative to the checkout, where make runs


def test_the_docs_show_commands() -> None:
    assert len(ALL_LINES) >= 20, [line.where for line in ALL_LINES]


@pytest.mark.parametrize("doc", ALL_LINES, ids=lambda line: line.where)
def test_command_line(doc: DocLine, env: None, ray_untouched: None, capsys: pytest.CaptureFixture[str]) -> None:
    if PLACEHOLDER.search(doc.text):
        pytest.skip(f"{doc.where}: placeholder line")
    tokens = shlex.split(PLACEHOLDER_NAME.sub(r"\1", doc.text), comments=True)
    if tokens[0] == "sftray":
        check_sftray(capsys, tokens[1:], doc.where)
        return
    variables = [t.split("=")[0] for t in tokens[1:] if re.match(r"^\w+=", t)]
    targets = [t for t in tokens[1:] if not re.match(r"^\w+=", t) and not t.startswith("-")]
    assert targets, f"{doc.where}: `{doc.text}` names no make target"
    for target in targets:
        assert target in makefile_targets(), f"{doc.where}: `make {target}`: no such target in the Makefile"
        assert target in make_help_targets(), f"{doc.where}: `make {target}` is not listed by `make help`"
    unknown = sorted(set(variables) - makefile_variables())
    assert not unknown, f"{doc.where}: `{doc.text}` sets {unknown}, which the Makefile never reads"
    for argv in sftray_commands_from_make(tokens[1:]):
        check_sftray(capsys, argv, f"{doc.where} (through the Makefile)")


def test_every_make_target_in_the_readme() -> None:
    """`make help` and the README agree: every target it lists is named in README.md, and every `make X` the docs
    name in prose is a target it lists."""
    readme = (ROOT / "README.md").read_text()
    missing = sorted(t for t in make_help_targets() if f"make {t}" not in readme)
    assert not missing, f"README.md never names these `make help` targets: {missing}"
    named = {(doc, t) for doc in DOCS for t in re.findall(r"`make ([a-z][\w-]*)", doc.read_text())}
    unknown = sorted(f"{doc.relative_to(ROOT)}: make {t}" for doc, t in named if t not in make_help_targets())
    assert not unknown, f"docs name make targets `make help` does not list: {unknown}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_relative_links_resolve() -> None:
    """Every relative markdown link of README.md and docs/*.md points at an existing file (and its #anchor, when it
    names one in a markdown file, at one of that file's headings)."""
    broken = []
    for doc in DOCS:
        for lineno, line in enumerate(doc.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # http:, https:, mailto:
                path, _, anchor = target.partition("#")
                dest = (doc.parent / path).resolve() if path else doc
                if not dest.exists():
                    broken.append(f"{doc.relative_to(ROOT)}:{lineno}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{doc.relative_to(ROOT)}:{lineno}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_configuration_reference_names_every_key(capsys: pytest.CaptureFixture[str], env: None) -> None:
    """docs/configuration.md names every key `sftray config` prints, so a new knob cannot go undocumented."""
    import yaml

    code, out, err = run_cli(capsys, "config")
    assert code == 0, err
    reference = (ROOT / "docs" / "configuration.md").read_text()

    def keys(node: object, prefix: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [k for key, value in node.items() for k in keys(value, f"{prefix}.{key}" if prefix else key)]
        return [prefix]

    missing = [key for key in keys(yaml.safe_load(out), "") if f"`{key}`" not in reference]
    assert not missing, f"docs/configuration.md does not name these keys: {missing}"

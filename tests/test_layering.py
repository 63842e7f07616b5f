"""The package layering of ``shared/STYLE.md``, read from the source with ``ast`` (no import, no Ray): no upward import
between layers, no import cycle but the deliberate one named here, no import of another package's ``_private`` name.

Every ``import`` counts, at module level and inside functions: a deferred import still ties the two modules
together (it only moves the cost to the first call).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    # config, and what sits beside it at the bottom: the output folder's names, atomic file writes
    "config": 0,
    "layout": 0,
    "atomic": 0,
    "data": 1,
    "core": 2,
    "models": 2,
    "train": 3,
    "eval": 3,
    "tune": 4,
    "tracking": 4,
    "recipes": 5,
    "preview": 5,  # the body of `sftray preview`, as a recipe is of the other commands
    "bench": 6,  # benchmarks: on top of everything but the CLI
    "cli": 6,
}
"""The second part of a module's name (``sftray.<part>...``) -> its layer: a module imports only its own layer and
lower ones (``sftray.config`` may be a module or a package: everything below it is the config layer)."""

SIDEWAYS = {("eval", "train"), ("tracking", "tune"), ("bench", "cli"), ("cli", "bench")}
"""(importer, imported) pairs of one layer that must not import each other: eval never needs train, tracking reads
a sweep's outcome from ``sftray.eval.outcome`` not from the Tune adapter, bench measures the code through its APIs
and the CLI parses arguments only."""

ALLOWED_CYCLES = [{"sftray.train.job", "sftray.train.loop"}]
"""Deliberate import cycles. ``train/job.py`` is what Ray Train's controller unpickles (the worker entry point and
its ``WorkerJob``), kept free of heavy imports; its entry point imports ``train/loop.py`` inside the function, on the
worker only, and the loop imports the job's types. Merging them would make the controller import the loop's modules
(transformers, pandas) on every run's path to its first step; ``tests/train/test_job.py`` checks that it does not."""


@dataclass(frozen=True)
class Import:
    importer: str
    """Dotted name of the importing module (``sftray.tune.sweep``, ``tests.tune.test_sweep``)."""
    path: Path
    line: int
    module: str
    """The imported module: a submodule when ``from package import submodule`` names one."""
    names: tuple[str, ...] = ()
    """The names a ``from ... import`` takes from ``module``."""

    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of this repository (a file or a folder of one)."""
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or base.is_dir()


def imports_of(path: Path, *, importer: str | None = None) -> list[Import]:
    """Every import of ``sftray`` modules in ``path`` (the module ``importer``, by default named for its path), at
    any depth (a function's own imports too)."""
    importer = importer or module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(importer, path, node.lineno, a.name) for a in node.names if a.name.startswith("sftray")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("sftray"):
                continue
            names = tuple(a.name for a in node.names)
            subs = [n for n in names if is_module(f"{base}.{n}")]
            found += [Import(importer, path, node.lineno, f"{base}.{n}") for n in subs]
            rest = tuple(n for n in names if n not in subs)
            if rest or not subs:
                found.append(Import(importer, path, node.lineno, base, rest))
    return found


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def layer_of(module: str) -> str:
    """``sftray.<part>``'s layer name (``part``); a module that has none fails the test: give it one in LAYERS."""
    part = module.split(".")[1]
    assert part in LAYERS, f"{module}: no layer for sftray.{part} in tests/test_layering.py LAYERS (see STYLE.md)"
    return part


def package_of(module: str) -> str:
    """``sftray.data.pipeline`` -> ``sftray.data``; a top-level module (``sftray.cli``) is its own package."""
    return ".".join(module.split(".")[:2])


def upward_imports(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        low, high = layer_of(imp.module), layer_of(imp.importer)
        if LAYERS[low] > LAYERS[high] or (high, low) in SIDEWAYS:
            why = " (one layer, but forbidden in SIDEWAYS)" if LAYERS[low] == LAYERS[high] else ""
            bad.append(
                f"{imp.where()}: {imp.importer} ({high}, layer {LAYERS[high]}) imports {imp.module} "
                f"({low}, layer {LAYERS[low]}){why}"
            )
    return bad


def cycles(imports: list[Import]) -> list[set[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.module)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in imp.module.split(".") if p.startswith("_") and not p.startswith("__")]
        if private and package_of(imp.module) != package_of(imp.importer):
            bad.append(f"{imp.where()}: {imp.importer} imports {', '.join(private)} from {imp.module}")
    return bad


@cache
def imports_in(folder: str) -> tuple[Import, ...]:
    """Every import of ``sftray`` modules in ``folder``'s Python files (read once for all the tests)."""
    return tuple(imp for path in sources(folder) for imp in imports_of(path))


def sftray_imports() -> list[Import]:
    return list(imports_in("sftray"))


def test_no_module_imports_a_higher_layer():
    bad = upward_imports(sftray_imports())
    if bad:
        flow = "config -> data -> core, models -> train, eval -> tune, tracking -> recipes -> cli"
        pytest.fail(f"upward imports (STYLE.md: {flow}):\n" + "\n".join(bad), pytrace=False)


def test_no_import_cycle_but_the_deliberate_one():
    imports = sftray_imports()
    bad = [c for c in cycles(imports) if c not in ALLOWED_CYCLES]
    lines = [
        f"{imp.where()}: {imp.importer} imports {imp.module}"
        for c in bad
        for imp in imports
        if imp.importer in c and imp.module in c
    ]
    if bad:
        pytest.fail("import cycles:\n" + "\n".join(lines), pytrace=False)


def test_no_module_or_test_imports_another_packages_private_name():
    imports = sftray_imports() + list(imports_in("tests"))
    bad = private_imports(imports)
    if bad:
        pytest.fail("private names imported across packages:\n" + "\n".join(bad), pytrace=False)


def test_the_checks_see_every_kind_of_import(tmp_path):
    """The parser finds deferred, relative and ``from package import module`` imports, and the checks flag them."""
    code = (
        "from sftray.recipes import prep\n"
        "def f():\n    import sftray.cli\n    from ..train.run import _private\n"
        "from sftray.tune.sweep import run_sweep\n"
    )
    path = tmp_path / "example.py"
    path.write_text(code)
    imports = imports_of(path, importer="sftray.tune.example")
    assert sorted((i.line, i.module, i.names) for i in imports) == [
        (1, "sftray.recipes.prep", ()),
        (3, "sftray.cli", ()),
        (4, "sftray.train.run", ("_private",)),
        (5, "sftray.tune.sweep", ("run_sweep",)),
    ]
    assert len(upward_imports(imports)) == 2  # recipes and cli; train is below tune
    assert private_imports(imports) == [f"{path}:4: sftray.tune.example imports _private from sftray.train.run"]
    loop = [Import("sftray.a.x", path, 1, "sftray.a.y"), Import("sftray.a.y", path, 1, "sftray.a.x")]
    assert cycles(loop) == [{"sftray.a.x", "sftray.a.y"}]

"""The rooms of the house and what each may import (docs/ARCHITECTURE.md, "Rooms").

Every module under src/edgeprism is parsed with `ast`; every import counts, at module level or inside a
function, under `if TYPE_CHECKING:` or not, absolute or relative. A string that is exactly the dotted name
of an edgeprism module (`["-m", "edgeprism.comm.job"]`, `importlib.import_module(...)`) counts
too: launching a module is depending on it. Each import is mapped to its package (the first name under
`edgeprism`), and the checks are:

- every import goes to a package in the same or a lower row of `LAYERS`, and every package is in `LAYERS`;
- no circle between packages;
- no circle between modules (an import inside a function is how the circles of the past got in).

A failure names file:line, both packages and their layers. To add a package, give it a row here and in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "edgeprism"

LAYERS: tuple[tuple[str, ...], ...] = (
    # -1. The machine's edgeprism folder (`$EDGEPRISM_HOME`): imports nothing of edgeprism; any room may use it.
    ("home",),
    # 0. Leaves: import no other edgeprism package but `home`.
    ("models", "compress", "energy", "testbed"),
    # 1. Process groups and the exchange (a testbed link is emulated in the transport); user inputs.
    ("comm", "inputs"),
    # 1b. Set-up-time assets: datasets and converted checkpoints (written in the inputs' file formats).
    ("assets",),
    # 2. The position-wise transform: a reference model + a codec + a group.
    ("partition",),
    # 3. Task fidelity on the real distributed path (loopback).
    ("evaluate",),
    # 4. Measurement of devices, links, energy and fidelity into a Profile.
    ("profile",),
    # 5. The pure planner over profiles.
    ("plan",),
    # 6. Serving plans: engine, groups, control.
    ("runtime",),
    # 7. Things that drive the runtime or the evaluation end to end.
    ("jobs", "bench", "calibrate", "api"),
    # 8. Entry points: the command line, the package root (its lazy `edgeprism.Engine`) and
    #    `python -m edgeprism` (the command, which a local cluster starts its workers with).
    ("cli", "edgeprism", "__main__"),
)
"""Lowest first. A package may import its own row and the rows below."""

ALLOWED: frozenset[str] = frozenset()
"""Files (relative to src/edgeprism) whose imports are not checked. Nothing else belongs here."""

ROOT = "edgeprism"
_MODULE_NAME = re.compile(r"edgeprism(\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass(frozen=True)
class Import:
    path: str
    """The importing file, relative to the package root (`profile/fidelity.py`)."""
    line: int
    module: str
    """What it names, resolved to a module of the tree (`edgeprism.evaluate.fidelity`)."""
    source: str
    """Package of the importing file."""
    target: str
    """Package of `module`."""
    launch: bool = False
    """Named in a string (a `-m` launch or `import_module`), not an import statement."""


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under `root` (the directory of the `edgeprism` package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [ROOT, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def package_of(module: str) -> str:
    """`edgeprism.plan.cost` -> `plan`; the root package itself -> `edgeprism`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _resolve(name: str, modules: Mapping[str, Path]) -> str:
    """The longest prefix of `name` that is a module of the tree (`from a.b import f` names `a.b`)."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def _named_modules(node: ast.AST, this: str, is_package: bool, modules: Mapping[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = this.split(".") if is_package else this.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            parent = ".".join(base + ([node.module] if node.module else []))
        else:
            parent = node.module or ""
        # `from edgeprism import assets` names the subpackage; `from edgeprism.plan import Plan` names plan.
        return [f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in modules else parent for alias in node.names]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
        return [node.value] if node.value in modules else []
    return []


def collect_imports(root: Path) -> list[Import]:
    """Every import of an edgeprism module by a module under `root`, in file and line order."""
    modules = module_names(root)
    found = []
    for this, path in modules.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for name in _named_modules(node, this, path.name == "__init__.py", modules):
                if name != ROOT and not name.startswith(ROOT + "."):
                    continue
                module = _resolve(name, modules)
                found.append(Import(rel, node.lineno, module, package_of(this), package_of(module),
                                    launch=isinstance(node, ast.Constant)))
    return sorted(found, key=lambda imp: (imp.path, imp.line, imp.module))


def checked(imports: Iterable[Import], allowed: Iterable[str] = ALLOWED) -> list[Import]:
    skip = set(allowed)
    return [imp for imp in imports if imp.path not in skip]


def layer_violations(imports: Iterable[Import], layers: Sequence[Sequence[str]]) -> list[str]:
    """One line per import that goes up a layer or touches a package missing from `layers`."""
    layer_of = {package: index for index, row in enumerate(layers) for package in row}
    problems = []
    for imp in imports:
        where = f"{imp.path}:{imp.line}"
        for package in dict.fromkeys((imp.source, imp.target)):
            if package not in layer_of:
                problems.append(f"{where}: package {package!r} is not in LAYERS; give it a row in "
                                "tests/test_layering.py and docs/ARCHITECTURE.md")
        if imp.source in layer_of and imp.target in layer_of and layer_of[imp.target] > layer_of[imp.source]:
            how = "launches" if imp.launch else "imports"
            problems.append(f"{where}: {imp.source} (layer {layer_of[imp.source]}) {how} {imp.module} "
                            f"({imp.target}, layer {layer_of[imp.target]}): a lower room may not use a higher one")
    return problems


def _cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def _describe_cycles(pairs: Mapping[tuple[str, str], Import]) -> list[str]:
    edges: dict[str, set[str]] = defaultdict(set)
    for source, target in pairs:
        edges[source].add(target)
    problems = []
    for component in _cycles(edges):
        members = set(component)
        witnesses = [f"{imp.path}:{imp.line} ({a} -> {b})" for (a, b), imp in sorted(pairs.items())
                     if a in members and b in members]
        problems.append(f"circle between {', '.join(component)}: {'; '.join(witnesses)}")
    return problems


def package_cycles(imports: Iterable[Import]) -> list[str]:
    """One line per circle between packages, with one import per edge of it."""
    pairs: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if imp.source != imp.target:
            pairs.setdefault((imp.source, imp.target), imp)
    return _describe_cycles(pairs)


def module_cycles(imports: Iterable[Import]) -> list[str]:
    """One line per circle between modules (import statements only; a launch is not an import)."""
    pairs: dict[tuple[str, str], Import] = {}
    for imp in imports:
        this = ".".join([ROOT, *Path(imp.path).with_suffix("").parts])
        this = this.removesuffix(".__init__")
        if not imp.launch and imp.module != this:
            pairs.setdefault((this, imp.module), imp)
    return _describe_cycles(pairs)


# -- the real tree --------------------------------------------------------------------------------------------


def test_no_import_goes_up_a_layer():
    problems = layer_violations(checked(collect_imports(SRC)), LAYERS)
    assert not problems, "\n".join(problems)


def test_no_circle_between_packages():
    problems = package_cycles(checked(collect_imports(SRC)))
    assert not problems, "\n".join(problems)


def test_no_circle_between_modules():
    problems = module_cycles(checked(collect_imports(SRC)))
    assert not problems, "\n".join(problems)


def test_layers_name_each_package_once_and_allowed_files_exist():
    packages = [package for row in LAYERS for package in row]
    assert len(packages) == len(set(packages)), packages
    missing = sorted(path for path in ALLOWED if not (SRC / path).exists())
    assert not missing, f"ALLOWED names files that are gone: {missing}; delete them from ALLOWED"


def test_the_checker_sees_imports_inside_functions_and_launches():
    imports = collect_imports(SRC)
    # profile/fidelity.py runs the evaluation inside a function; partition/transform.py imports at the top.
    assert any(imp.path == "profile/fidelity.py" and imp.target == "evaluate" for imp in imports)
    assert any(imp.path == "partition/transform.py" and imp.target == "comm" for imp in imports)
    assert any(imp.launch for imp in imports)  # `-m edgeprism....` launches are seen too


# -- the checker on synthetic trees ---------------------------------------------------------------------------


def _tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "edgeprism"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_an_upward_import_inside_a_function_is_reported(tmp_path):
    root = _tree(tmp_path, {
        "low/__init__.py": "",
        "low/a.py": "import os\n\n\ndef f():\n    from edgeprism.high.b import g\n    return g()\n",
        "high/__init__.py": "",
        "high/b.py": "from edgeprism.low import a\n\n\ndef g():\n    return 1\n",
    })
    problems = layer_violations(collect_imports(root), (("low",), ("high",)))
    assert problems == ["low/a.py:5: low (layer 0) imports edgeprism.high.b (high, layer 1): "
                        "a lower room may not use a higher one"]


def test_relative_imports_and_launch_strings_are_resolved(tmp_path):
    root = _tree(tmp_path, {
        "low/__init__.py": "from . import a\n",
        "low/a.py": "from ..high import b\n",
        "low/c.py": "ARGV = ['-m', 'edgeprism.high.b']\n",
        "high/__init__.py": "",
        "high/b.py": "",
    })
    problems = layer_violations(collect_imports(root), (("low",), ("high",)))
    assert [p.split(":")[0] for p in problems] == ["low/a.py", "low/c.py"]
    assert "launches edgeprism.high.b" in problems[1]


def test_unknown_package_and_circles_are_reported(tmp_path):
    root = _tree(tmp_path, {
        "one/__init__.py": "",
        "one/x.py": "import edgeprism.two.y\n",
        "two/__init__.py": "",
        "two/y.py": "def f():\n    import edgeprism.one.x\n",
        "three/__init__.py": "import edgeprism.one\n",
    })
    imports = collect_imports(root)
    assert any("package 'three' is not in LAYERS" in p for p in layer_violations(imports, (("one", "two"),)))
    assert package_cycles(imports) == ["circle between one, two: one/x.py:1 (one -> two); two/y.py:2 (two -> one)"]
    assert module_cycles(imports) == ["circle between edgeprism.one.x, edgeprism.two.y: "
                                      "one/x.py:1 (edgeprism.one.x -> edgeprism.two.y); "
                                      "two/y.py:2 (edgeprism.two.y -> edgeprism.one.x)"]
    assert package_cycles(checked(imports, {"two/y.py"})) == []

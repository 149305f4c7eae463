"""The code's import structure, read with ``ast`` (nothing is imported): no module uses another
module's private names, and no two modules import each other, directly or around a loop, at any
level (an import inside a function still ties the two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lmeye", "pipelines", "schemas", "jobs", "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The repository module ``name`` (a module or a name inside one) belongs to; None: not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[ast.AST, str, str]]:
    """(node, imported dotted name, local alias) of every import in ``module``, at any level; imports
    for annotations only (``if TYPE_CHECKING:``) are left out: they never run."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = {id(n) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node, a.name, a.asname or a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out += [(node, f"{base}.{a.name}", a.asname or a.name) for a in node.names]
    return out


def _private(name: str) -> bool:
    last = name.rpartition(".")[2]
    return last.startswith("_") and not last.startswith("__")


def test_no_module_uses_another_modules_private_names():
    found = set()
    for module, path in MODULES.items():
        rel = path.relative_to(REPO).as_posix()
        aliases = {}
        for _, name, alias in _imports(module):
            owner = _owner(name)
            if owner is None or owner == module:
                continue
            if _private(name) and name != owner:  # from ours import _name
                found.add((rel, name))
            if name == owner:  # a module of ours, used as alias._name below
                aliases[alias] = owner
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                found.add((rel, f"{aliases[node.value.id]}.{node.attr}"))
    assert found == set()


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    graph = {m: {o for _, name, _ in _imports(m) if (o := _owner(name)) not in (None, m)} for m in MODULES}
    assert _cycles(graph) == []


def test_the_checks_see_a_private_import_and_a_cycle():
    """The two checks above on made-up modules: they would catch what they look for."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _private("pipelines.train._paths") and not _private("pipelines.train.stage_dir")
    assert not _private("lmeye.model.__init__")
    assert _owner("pipelines.train._paths") == "pipelines.train" and _owner("numpy.isin") is None

"""The package is layered by part: no module imports a later layer, and no
import cycle exists (pure logic: reads the sources, no root)."""
import ast
import os

import drb_uring

ROOT = os.path.dirname(drb_uring.__file__)
# Lower layers first. A module may import its own layer and those before it.
LAYERS = [
    {"", "errors", "spec", "linux", "procs", "protocol", "bpf"},
    {"enforce"},
    {"ring"},
    {"channel"},
    {"disk"},
    {"domains"},
    {"tools", "ops", "__main__"},
]


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise AssertionError(f"part {part!r} has no layer; add it to LAYERS")


def _modules():
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))
                name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                yield name, os.path.join(d, f)


def _imports(path: str, module: str):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("drb_uring"):
                    yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("drb_uring"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                yield full if _is_module(full) else node.module


def _is_module(name: str) -> bool:
    base = os.path.join(os.path.dirname(ROOT), *name.split("."))
    parent, leaf = os.path.split(base)
    return os.path.exists(base + ".py") or os.path.isdir(base) or (
        os.path.isdir(parent) and any(f.startswith(leaf + ".") and f.endswith(".so")
                                      for f in os.listdir(parent)))


def test_no_module_imports_a_later_layer():
    bad = []
    for mod, path in _modules():
        for imp in _imports(path, mod):
            if _rank(_part(imp)) > _rank(_part(mod)):
                bad.append(f"{mod} imports {imp}")
    assert not bad, bad


def test_no_import_cycle():
    graph = {mod: {i for i in _imports(path, mod)} for mod, path in _modules()}
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen or m not in graph:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        seen.add(m)
    for m in graph:
        visit(m)

"""The package's layout rules (issue 13), read from the source: no import cycle among the modules
of `sweeper/` (imports inside functions counted), `analysis` imported only by the command line,
Ray's private APIs only in `sweeper/ray_compat.py`, no module over 700 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sweeper"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, resolved to absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(p) if m in files and m != name}
            for name, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_graph_sees_function_local_imports() -> None:
    graph = _graph()
    # run.py imports analysis inside a function; the walk must see such imports.
    assert any(m.startswith("analysis") for m in _imports(PKG / "run.py"))
    assert "sweeper.orchestration" in graph["sweeper.run"]


def test_no_import_cycle() -> None:
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_command_line_imports_analysis() -> None:
    users = sorted(_module_name(p) for p in PKG.rglob("*.py")
                   if any(m == "analysis" or m.startswith("analysis.") for m in _imports(p)))
    assert users == ["sweeper.run"], users


def test_private_ray_apis_only_in_ray_compat() -> None:
    private = ("ray._private", "ray._raylet", "ray.train._internal", "ray.tune.impl",
               "ray.train.v2._internal")
    users = sorted(_module_name(p) for p in PKG.rglob("*.py")
                   if any(m.startswith(private) for m in _imports(p))
                   or "_local_tuner" in p.read_text(encoding="utf-8"))
    assert users in ([], ["sweeper.ray_compat"]), users


def test_no_module_over_700_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 700}
    assert not long, long

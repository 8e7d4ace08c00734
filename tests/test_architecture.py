"""The dependency rule of docs/architecture.md, checked over the source with `ast`: every import
between the project's packages points down, and no modules import each other in a circle.

Function-body imports count like top-level ones: a lazy import is still a dependency. Imports
under `if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "selfspec-vllm-cpu"

# Which project packages each one may import. core is the contract at the bottom; the two halves
# (specialize offline, router + serve online) meet only in core; evaluation measures what serve
# and router do; bench and the top command (selfspec/) sit above the library; the vLLM CPU plugin
# stands apart (vLLM and the Serve engine find it by entry point, nobody imports it).
ALLOWED = {
    "core": set(),
    "specialize": {"core"},
    "router": {"core"},
    "serve": {"core", "router"},
    "evaluation": {"core", "router", "serve"},
    "bench": {"core", "specialize", "router", "serve", "evaluation"},
    "selfspec": {"core", "specialize", "router", "serve", "evaluation", "bench"},
    "selfspec_vllm_cpu": set(),
}


def package_roots(repo: Path) -> dict[str, Path]:
    roots = {name: repo / name for name in ALLOWED if (repo / name / "__init__.py").is_file()}
    plugin = repo / "plugins" / "selfspec-vllm-cpu" / "selfspec_vllm_cpu"
    if plugin.is_dir():
        roots["selfspec_vllm_cpu"] = plugin
    return roots


def modules(repo: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every package in ALLOWED found under `repo`."""
    out = {}
    for name, root in package_roots(repo).items():
        for f in root.rglob("*.py"):
            parts = (name, *f.relative_to(root).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(repo: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import mod` counts as pkg.mod)."""
    mods = modules(repo)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                    base = ".".join([*pkg, base] if base else pkg)
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                         for a in node.names]
            else:
                continue
            targets.update(t for t in found if t.split(".")[0] in ALLOWED and t != name)
        graph[name] = targets
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        top = src.split(".")[0]
        for dst in sorted(targets):
            other = dst.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                bad.append(f"{src} imports {dst}: {top} may import only "
                           f"{', '.join(sorted(ALLOWED[top])) or 'nothing of the project'}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (Tarjan's SCCs).
    A package's own __init__ importing its submodules is not counted as the reverse edge."""
    edges = {m: {t for t in ts if t in graph} for m, ts in graph.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_package_is_found():
    assert set(package_roots(REPO)) == set(ALLOWED)


def test_imports_point_down():
    assert upward_imports(imports(REPO)) == []


def test_no_import_cycles():
    assert cycles(imports(REPO)) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    for pkg, files in {"core": {"a.py": "from specialize import b\n"},
                       "specialize": {"b.py": "def f():\n    from specialize.c import x\n",
                                      "c.py": "from .b import f\n"}}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    graph = imports(tmp_path)
    assert upward_imports(graph) == [
        "core.a imports specialize.b: core may import only nothing of the project"]
    assert cycles(graph) == [["specialize.b", "specialize.c"]]

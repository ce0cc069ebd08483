"""The package's own import graph, read from the source with ast: no cycles, and every import obeys the
rules table in docs/ARCHITECTURE.md. Also the size rules of the house style and no private names across
modules."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hybrid", "kernels_cpu", "kernels_gpu")


def modules() -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for p in (ROOT / top).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every project import, at any depth in the file."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")
                up = up[:len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{base}.{a.name}"
                out.append((sub, node.lineno, []) if sub in known else (base, node.lineno, [a.name]))
    return out


def rules() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = {}
    for m in re.finditer(r"^\| `([\w.]+)` \| (.*) \|$", text, re.M):
        table[m.group(1)] = set(re.findall(r"`([\w.]+)`", m.group(2)))
    assert table, "docs/ARCHITECTURE.md has no import-rules table"
    return table


def package_of(mod: str, table: dict[str, set[str]]) -> str:
    """The most specific package in the rules table that holds mod."""
    best = None
    for pkg in table:
        if mod == pkg or mod.startswith(pkg + "."):
            best = pkg if best is None or len(pkg) > len(best) else best
    assert best is not None, f"{mod} belongs to no package in docs/ARCHITECTURE.md's import rules"
    return best


def test_every_import_obeys_the_rules_in_architecture_md():
    known, table = modules(), rules()
    bad = []
    for name, path in known.items():
        src = package_of(name, table)
        for target, line, _ in imports(name, path, known):
            dst = package_of(target, table)
            if dst != src and dst not in table[src] and src != "hybrid":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({src} may not import {dst})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    known = modules()
    graph = {n: {t if t in known else t.rpartition(".")[0] for t, _, _ in imports(n, p, known)} & known.keys()
             for n, p in known.items()}
    # a package's __init__ that re-exports its modules is an edge up, not a cycle of behaviour
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n} from {t}"
           for name, p in known.items() for t, line, names in imports(name, p, known)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("top", PACKAGES)
def test_modules_and_functions_stay_readable(top):
    """House style: no module past ~400 lines, no function past ~80."""
    long = []
    for p in (ROOT / top).rglob("*.py"):
        src = p.read_text()
        if src.count("\n") > 400:
            long.append(f"{p.relative_to(ROOT)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted((ROOT / "hybrid").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80 and "import" in doc, f"{init.relative_to(ROOT)} needs a docstring: what it owns, what it may import"


def test_the_rules_table_names_every_package():
    table, known = rules(), modules()
    for name in known:
        package_of(name, table)  # asserts


def test_nothing_probes_the_expert_backend():
    """The backend is used through hybrid.experts.backend.ExpertBackend only: no hasattr/getattr on it."""
    probe = re.compile(r"\b(ex|experts|backend)\b")
    bad = []
    for p in (ROOT / "hybrid").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") \
                    and node.args and probe.search(ast.unparse(node.args[0])):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "\n".join(bad)

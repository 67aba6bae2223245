"""The package's shape: no import cycles, a JAX-free runtime module, every dependency used,
every config field read."""
import ast
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "rat_jax"
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "common"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """rat_jax module -> rat_jax modules it imports anywhere in its body (function-level imports
    included). `from pkg import name` points at pkg.name when that is a module, else at pkg; the
    implicit import of a parent package's __init__ is not an edge."""
    graph = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("rat_jax")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if not base.startswith("rat_jax"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    edges.add(full if _is_module(full) else base)
        graph[name] = {e for e in edges if e != name and _is_module(e)}
    return graph


def _cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_rat_jax_modules():
    graph = import_graph()
    assert {"rat_jax.engine", "rat_jax.trees", "rat_jax.data.protocol"} <= graph["rat_jax.stages"]
    assert _cycles(graph) == []


def test_cycle_detector_sees_a_function_level_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_runtime_and_package_import_no_jax():
    code = "import rat_jax.runtime, rat_jax, sys; assert 'jax' not in sys.modules, 'jax imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr


def _install_requires():
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "INSTALL_REQUIRES":
            return [re.split(r"[<>=!~\[ ]", s, maxsplit=1)[0] for s in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no INSTALL_REQUIRES list")


def test_every_install_requires_entry_is_imported_by_the_package():
    from importlib import metadata
    dist_modules = {}
    for module, dists in metadata.packages_distributions().items():
        for d in dists:
            dist_modules.setdefault(d.lower().replace("_", "-"), set()).add(module)
    source = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    unused = []
    for dist in _install_requires():
        modules = dist_modules.get(dist.lower().replace("_", "-"), set())
        assert modules, f"{dist} is not installed"
        if not any(re.search(rf"(import|from) {re.escape(m)}\b|__import__\(.{re.escape(m)}\b|"
                             rf"\"{re.escape(m)}\"", source) for m in modules):
            unused.append(dist)
    assert unused == [], f"install_requires entries nothing imports: {unused}"


def _load_config(path, variant):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _leaf_keys(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaf_keys(value, f"{prefix}{key}.")
            if not len(value):
                yield f"{prefix}{key}"
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_field_is_read_by_the_code(path):
    """Each field's name is read somewhere in rat_jax as `.name`, `["name"]` or `get("name"`
    (dataset entries under `aux` are read as a mapping)."""
    source = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    config = _load_config(path, None)
    unread = []
    for key in _leaf_keys(config):
        parts = key.split(".")
        if parts[0] == "aux" and len(parts) > 1:  # aux.<dataset name>.<field>: a mapping entry
            parts = ["target"] + parts[2:]
        leaf = parts[-1]
        if not re.search(rf"\.{leaf}\b|\[[\"']{leaf}[\"']\]|get\([\"']{leaf}[\"']", source):
            unread.append(key)
    assert unread == [], f"config fields no code reads: {unread}"

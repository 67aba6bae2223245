"""rat_jax.data's modules import each other without a cycle, function-level imports included."""
import ast
import pathlib

import rat_jax.data

PACKAGE = "rat_jax.data"
DATA_DIR = pathlib.Path(rat_jax.data.__file__).parent
MODULES = sorted(p.stem for p in DATA_DIR.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> set:
    """rat_jax.data submodules that `module` imports anywhere in its source (the package's
    __init__ counts as "__init__")."""
    tree = ast.parse((DATA_DIR / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside rat_jax.data
                base = ".".join([PACKAGE] + ([base] if base else []))
            names = [base] if base != PACKAGE else [f"{PACKAGE}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE:
                out.add("__init__")
            elif name.startswith(PACKAGE + "."):
                sub = name[len(PACKAGE) + 1:].split(".")[0]
                out.add(sub if sub in MODULES else "__init__")
    return out


def test_no_module_imports_the_package_init():
    # the package __init__ imports every module, so importing it from one closes a cycle
    offenders = {m: sorted(_imports(m)) for m in MODULES if "__init__" in _imports(m)}
    assert not offenders, offenders


def test_no_import_cycle():
    graph = {m: _imports(m) - {"__init__"} for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = "done"
    for m in MODULES:
        visit(m, [])


def test_sources_are_separate_modules():
    graph = {m: _imports(m) for m in MODULES}
    assert {"demo", "domainbed", "tfds_source", "types"} <= graph["sources"]
    assert graph["types"] <= {"protocol"}
    assert "sources" not in set().union(*(graph[m] for m in MODULES if m != "sources"))

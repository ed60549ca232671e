"""The codebase's shape, as measures anyone can check: no import circle between the package's modules, no
private name imported across modules, and train() short enough to read as the algorithm."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ppo_lm"


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        out[name] = (f, ast.parse(f.read_text()))
    return out


def _relative_imports(name: str, path: Path, tree: ast.Module):
    """(imported module, imported names) of every relative import, at any depth (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.module:
                yield ".".join(base + [node.module]), [a.name for a in node.names]
            else:  # from . import tasks: the submodules themselves
                for a in node.names:
                    yield ".".join(base + [a.name]), []


def test_no_import_circle():
    mods = _modules()
    graph = {m: {target for target, _ in _relative_imports(m, *mods[m]) if target in mods and target != m}
             for m in mods}
    # a package importing its own submodules (and they it) is how Python packages work: not a circle
    graph = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in graph.items()}
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            pytest.fail("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen:
            return
        stack.append(m)
        for t in sorted(graph[m]):
            visit(t)
        stack.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)


def test_no_private_name_imported_across_modules():
    mods = _modules()
    found = [f"{m} imports {n} from {t}" for m in mods for t, names in _relative_imports(m, *mods[m])
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not found, found


def test_train_reads_as_the_algorithm():
    tree = _modules()["ppo_lm.trainer"][1]
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 < 40

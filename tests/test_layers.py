"""The layers run one way, read from the source (every import statement, also those inside functions):

    dcls_jax <- models <- cam <- evaluation <- evaluate.py / train.py   (data beside: it imports only dcls_jax;
    configs, the training configurations, imports nothing of the project)

and no module imports itself through a circle."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dcls_jax", "models", "cam", "data", "evaluation", "configs")
SCRIPTS = ("evaluate", "train")
# what each layer may import of the project
ALLOWED = {
    "dcls_jax": {"dcls_jax"},
    "models": {"dcls_jax", "models"},
    "cam": {"dcls_jax", "models", "cam"},
    "data": {"dcls_jax", "data"},
    "evaluation": {"dcls_jax", "models", "cam", "data", "evaluation", "configs"},
    "configs": {"configs"},
}
OURS = set(PACKAGES) | set(SCRIPTS)


def module_files() -> dict[str, Path]:
    files = {name: ROOT / f"{name}.py" for name in SCRIPTS}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            files[".".join(rel.parts).removesuffix(".__init__")] = path
    return files


def imports(path: Path, module: str) -> set[str]:
    """The project modules `path` imports (absolute and relative imports, at any depth of the file)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] in OURS}


FILES = module_files()


def resolve(name: str) -> str | None:
    """The module a dotted import name lands in (`models.registry.get_entry` -> `models.registry`)."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {m: {t for n in imports(p, m) if (t := resolve(n)) and t != m} for m, p in FILES.items()}


def test_the_tree_is_read():
    assert {"dcls_jax.conv", "models.registry", "cam.methods", "data.clickme", "evaluate", "train"} <= set(FILES)
    assert "dcls_jax" in {t.split(".")[0] for t in GRAPH["models.layers"]}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_lies_below(layer):
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if m.split(".")[0] == layer
                 for t in targets if t.split(".")[0] not in ALLOWED[layer])
    assert not bad, "\n".join(bad)


def test_benchmarks_use_the_library_not_the_scripts():
    bad = sorted(f"{p.name} imports {n}" for p in (ROOT / "benchmarks").glob("*.py")
                 for n in imports(p, f"benchmarks.{p.stem}") if n.split(".")[0] in SCRIPTS)
    assert not bad, "\n".join(bad)


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        state[u] = "done"
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_no_import_circle():
    circle = find_circle(GRAPH)
    assert circle is None, " -> ".join(circle)


def test_the_checks_can_fail(tmp_path):
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    src = "import models\nfrom cam import methods\ndef f():\n    from data.download import x\n"
    probe = tmp_path / "probe.py"
    probe.write_text(src)
    assert imports(probe, "cam.probe") == {"models", "cam", "cam.methods", "data.download", "data.download.x"}
    bad = {"cam.probe": {resolve(n) for n in imports(probe, "cam.probe")}}
    assert {t for t in bad["cam.probe"] if t.split(".")[0] not in ALLOWED["cam"]} == {"data.download"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

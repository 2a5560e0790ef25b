"""What `pip install dcls-jax` puts into site-packages: the `dcls_jax` package alone, importing nothing beyond the
standard library and the four base dependencies pyproject.toml declares (jax, flax, optax, numpy). The study
(models/, cam/, data/, evaluate.py, train.py, configs/) runs from the checkout and stays out of the wheel."""
import ast
import os
import sys
import tomllib
from fnmatch import fnmatchcase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"jax", "flax", "optax", "numpy"}


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    for stop in "<>=!~;[ ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower()


def test_base_dependencies_are_jax_flax_optax_numpy():
    assert {_name(r) for r in _pyproject()["project"]["dependencies"]} == BASE


def test_dcls_jax_imports_only_its_base_dependencies():
    imported = {}
    package = os.path.join(ROOT, "dcls_jax")
    for folder, _, files in os.walk(package):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            for node in ast.walk(ast.parse(open(path).read(), path)):     # function-level imports too
                if isinstance(node, ast.Import):
                    roots = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    roots = [node.module.split(".")[0]]
                else:
                    continue
                for root in roots:
                    imported.setdefault(root, []).append(os.path.relpath(path, ROOT))
    assert "jax" in imported and "flax" in imported                       # the walk saw the package
    allowed = BASE | {"dcls_jax"} | set(sys.stdlib_module_names)
    outside = {name: where for name, where in imported.items() if name not in allowed}
    assert not outside, f"dcls_jax is installed alone with {sorted(BASE)}; it imports {outside}"


def test_only_dcls_jax_is_installed():
    tool = _pyproject()["tool"]["setuptools"]
    assert "py-modules" not in tool
    find = tool["packages"]["find"]
    assert find.get("where", ["."]) == ["."] and find.get("namespaces") is False
    packages = []                                  # setuptools' find: folders with __init__.py, fnmatch'ed
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        name = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        if "__init__.py" in files and any(fnmatchcase(name, pattern) for pattern in find["include"]) \
                and not any(fnmatchcase(name, pattern) for pattern in find.get("exclude", ())):
            packages.append(name)
    assert "dcls_jax" in packages
    assert all(p == "dcls_jax" or p.startswith("dcls_jax.") for p in packages), packages

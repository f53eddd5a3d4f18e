"""The three layers stay layers, and only ``rmt_fast`` is a top-level import name.

* ``kernels/`` (installed as ``rmt_fast.kernels``) imports neither the runtime nor transformers;
* ``rmt_fast/`` (the runtime) never imports the benchmarks;
* no code imports the folders by their bare names (``kernels`` is Hugging Face's hub-kernels package).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports resolved against its package."""
    package = {"kernels": "rmt_fast.kernels", "benchmarks": "rmt_fast.bench"}.get(path.parent.name)
    if package is None:
        rel = path.parent.relative_to(ROOT).parts
        package = ".".join(rel)
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                found.append((node.lineno, arg.value))
    return found


def _py_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _offending(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in _py_files(folder):
        for line, name in _imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_kernels_import_neither_runtime_nor_transformers():
    files = _py_files("kernels")
    assert files, "kernels/ has no Python files?"
    bad = []
    for path in files:
        for line, name in _imports(path):
            top = name.split(".")[0]
            runtime = top == "rmt_fast" and not (name == "rmt_fast.kernels" or name.startswith("rmt_fast.kernels."))
            if runtime or top in ("transformers", "benchmarks"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert bad == []


def test_runtime_never_imports_the_benchmarks():
    assert _offending("rmt_fast", ("rmt_fast.bench", "benchmarks")) == []


@pytest.mark.parametrize("folder", ["kernels", "rmt_fast", "benchmarks", "tests", "examples"])
def test_no_bare_folder_imports(folder):
    assert _offending(folder, ("kernels", "benchmarks")) == []


def test_layer_rule_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself: a runtime file importing the benchmarks is reported."""
    fake = tmp_path / "rmt_fast"
    fake.mkdir()
    (fake / "bad.py").write_text("from .bench import cli\nimport rmt_fast.bench.common\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert len(_offending("rmt_fast", ("rmt_fast.bench",))) == 2


def test_importing_kernels_loads_no_transformers():
    code = "import sys, rmt_fast, rmt_fast.kernels.layout; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_installed_top_level_names():
    """The build installs the folders under one name: rmt_fast/kernels and rmt_fast/bench are links to the
    top-level kernels/ and benchmarks/ (no package-dir mapping, which an editable install cannot follow into a
    namespace portion)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {p.split(".")[0] for p in cfg["packages"]} == {"rmt_fast"}
    assert {"rmt_fast.kernels", "rmt_fast.bench"} <= set(cfg["packages"]) and "package-dir" not in cfg
    for link, target in (("kernels", "kernels"), ("bench", "benchmarks")):
        path = ROOT / "rmt_fast" / link
        assert path.is_symlink() and os.readlink(path) == f"../{target}", path


def test_cuda_graph_does_not_import_fast():
    """No import circle: the graph runner takes DecoderStatic from the segment plans, not from fast.py."""
    names = [name for _, name in _imports(ROOT / "rmt_fast" / "cuda_graph.py")]
    assert "rmt_fast.fast" not in names and "rmt_fast.segments" in names


def _type_checking_imports() -> dict[str, str]:
    """name -> relative module of every ``from .x import name`` under ``if TYPE_CHECKING:`` in rmt_fast/__init__.py."""
    tree = ast.parse((ROOT / "rmt_fast" / "__init__.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.dump(imp)
                out.update({alias.name: "." + imp.module for alias in imp.names})
    return out


def test_public_names_are_imported_explicitly_and_load_lazily():
    """rmt_fast/__init__.py names every public name in explicit imports (what editors and type checkers read),
    the run-time table loads the same names from the same modules, and each resolves to the object its module
    defines."""
    import importlib

    import rmt_fast

    explicit = _type_checking_imports()
    assert explicit == rmt_fast._LAZY
    assert sorted(explicit) == sorted(rmt_fast.__all__)
    for name, module in explicit.items():
        assert getattr(rmt_fast, name) is getattr(importlib.import_module(module, "rmt_fast"), name), name
    with pytest.raises(AttributeError, match="no attribute 'FastRNN'"):
        rmt_fast.FastRNN  # noqa: B018


def test_importing_rmt_fast_is_cheap():
    """``import rmt_fast`` loads neither transformers nor the runtime modules (they load on first use)."""
    code = "import sys, rmt_fast; print(sorted(m for m in sys.modules if m.startswith(('rmt_fast', 'transformers'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['rmt_fast']"

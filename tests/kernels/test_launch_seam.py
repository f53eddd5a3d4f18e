"""The seam between ``kernels/launch_configs.py`` and its users: no file outside launch_configs reads or patches
its underscore names (``_INTERPRET``, ``_PLANS``, ...); they go through its public functions (``cached_plan``,
``remember_shape_plan``, ``interpreter_mode``, ...). Also what those functions promise."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from rmt_fast.kernels import launch_configs as lc

ROOT = Path(__file__).resolve().parents[2]
SEAM = ROOT / "kernels" / "launch_configs.py"
_PATCHERS = {"setattr", "getattr", "delattr", "hasattr"}  # also monkeypatch.setattr / .delattr


def _is_module_ref(node: ast.AST, aliases: set[str]) -> bool:
    """``lc`` (an alias of the module) or ``anything.launch_configs``."""
    if isinstance(node, ast.Name):
        return node.id in aliases
    return isinstance(node, ast.Attribute) and node.attr == "launch_configs"


def _private(name) -> bool:
    return isinstance(name, str) and name.startswith("_") and not name.startswith("__")


def private_uses(source: str) -> list[str]:
    """Every use of a launch_configs underscore name in ``source``: ``lc._X`` for an alias ``lc`` of the module
    (or ``x.launch_configs._X``), ``from ...launch_configs import _X``, ``setattr(lc, "_X", ...)`` and the like
    (``monkeypatch.setattr`` too), and the dotted string ``"...launch_configs._X"``."""
    tree = ast.parse(source)
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.endswith("launch_configs") and a.asname}
        elif isinstance(node, ast.ImportFrom):
            aliases |= {a.asname or a.name for a in node.names if a.name == "launch_configs"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("launch_configs"):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr) and _is_module_ref(node.value, aliases):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            arg = node.args[1]
            if (
                name in _PATCHERS
                and _is_module_ref(node.args[0], aliases)
                and isinstance(arg, ast.Constant)
                and _private(arg.value)
            ):
                found.append(f"line {node.lineno}: {name}(..., {arg.value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "launch_configs._" in node.value:
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def _python_files():
    for folder, dirs, files in os.walk(ROOT):  # symlinks (rmt_fast/kernels, rmt_fast/bench) are not followed
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "dist", "__pycache__")]
        yield from (Path(folder) / f for f in files if f.endswith(".py"))


def test_no_file_outside_launch_configs_uses_its_private_names():
    files = [p for p in _python_files() if p not in (SEAM, Path(__file__).resolve())]  # this file: the examples
    assert any(p.name == "triton_attention.py" for p in files) and any(p.name == "conftest.py" for p in files)
    offenders = {str(p.relative_to(ROOT)): uses for p in files if (uses := private_uses(p.read_text()))}
    assert not offenders, f"use launch_configs' public functions instead: {offenders}"


@pytest.mark.parametrize(
    "source",
    [
        "from rmt_fast.kernels import launch_configs as lc\nlc._PLANS.get(1)",
        "from . import launch_configs as _cfg\nif _cfg._INTERPRET: pass",
        "from rmt_fast.kernels import launch_configs\nlaunch_configs._SHAPE_PLANS.clear()",
        "import rmt_fast.kernels.launch_configs as m\nm._CONFIG_CACHE[1] = 2",
        "def f(mp, tune_plan):\n    mp.setattr(tune_plan.launch_configs, '_INTERPRET', False)",
        "from rmt_fast.kernels import launch_configs as lc\n"
        "def f(mp):\n    mp.setattr(lc, '_INTERPRET_BLOCKS', (16, 16))",
        "from .launch_configs import _OVERRIDE",
        "def f(mp):\n    mp.setattr('rmt_fast.kernels.launch_configs._INTERPRET', False)",
    ],
)
def test_the_seam_check_catches_each_way_in(source):
    assert private_uses(source)


def test_the_seam_check_passes_public_names_and_other_modules():
    source = (
        "from rmt_fast.kernels import launch_configs as lc, dispatch\nlc.cached_plan(1)\n"
        "lc.MAX_SHAPE_PLANS\ndispatch._OVERRIDE\nsetattr(lc, 'MAX_SHAPE_PLANS', 3)\nx._PLANS"
    )
    assert private_uses(source) == []


# ------------------------------------------------------------------------------------------ the public API
@pytest.fixture
def caching():
    with lc.interpreter_mode(False):
        lc.clear_launch_cache()
        yield
        lc.clear_launch_cache()


def test_caches_remember_and_forget(caching):
    cfg = lc.LaunchConfig(16, 16, 4, 1)
    assert lc.caching() and lc.cached_plan("p") is None and lc.cached_shape_plan("s") is None
    lc.remember_config(("fwd", 16, torch.float16, "d"), cfg)
    lc.remember_plan("p", "plan")
    lc.remember_shape_plan("s", "shape plan")
    assert lc.cached_config(("fwd", 16, torch.float16, "d")) is cfg
    assert lc.cached_plan("p") == "plan" and lc.cached_shape_plan("s") == "shape plan"
    assert lc.cache_snapshot() == ({("fwd", 16, torch.float16, "d"): cfg}, {"p": "plan"}, {"s": "shape plan"})
    lc.forget_plans()  # the configurations stay
    assert lc.cache_snapshot() == ({("fwd", 16, torch.float16, "d"): cfg}, {}, {})
    lc.clear_launch_cache()
    assert lc.cache_snapshot() == ({}, {}, {})


def test_nothing_is_cached_or_read_while_overriding_or_interpreting(caching):
    lc.remember_plan("p", "plan")
    for block in (lc.override_configs(fwd=(16, 16, 4, 1)), lc.interpreter_mode(True)):
        with block:
            assert not lc.caching() and lc.cached_plan("p") is None
            lc.remember_plan("q", "other")
            lc.remember_shape_plan("s", "shape plan")
            lc.remember_config("c", "config")
        assert lc.caching() and lc.cached_plan("p") == "plan"
    assert lc.cache_snapshot() == ({}, {"p": "plan"}, {})


def test_override_state_is_public_and_restored():
    assert not lc.override_active() and lc.override_config("fwd") is None
    with lc.override_configs(dq=(16, 32, 4, 1)):
        assert lc.override_active() and lc.override_config("dq") == lc.LaunchConfig(16, 32, 4, 1)
        assert lc.override_config("fwd") is None
    assert not lc.override_active()


def test_shape_plan_cache_is_emptied_at_its_bound(caching, monkeypatch):
    monkeypatch.setattr(lc, "MAX_SHAPE_PLANS", 2)
    for key in range(5):
        lc.remember_shape_plan(key, key)
        assert 1 <= len(lc.cache_snapshot().shape_plans) <= 2 and lc.cached_shape_plan(key) == key


def test_interpreter_mode_sets_and_restores_the_flag_and_blocks():
    before = lc.interpreting(), lc.heuristic_config("fwd", 64, torch.float16)
    with lc.interpreter_mode(True, blocks=(32, 16)):
        assert lc.interpreting() and lc.heuristic_config("fwd", 64, torch.float16).as_tuple()[:2] == (32, 16)
        with lc.interpreter_mode(False):
            assert not lc.interpreting() and lc.heuristic_config("fwd", 64, torch.float16).block_m >= 32
        assert lc.interpreting()
    assert (lc.interpreting(), lc.heuristic_config("fwd", 64, torch.float16)) == before
    with pytest.raises(ValueError, match="power of two"):
        with lc.interpreter_mode(blocks=(24, 16)):
            pass

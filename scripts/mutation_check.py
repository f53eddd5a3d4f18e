"""A small mutation tester (not part of CI): does the test selection notice a one-site change to the code?

For each mutation site of the targets (comparison operators swapped, + and - swapped, * and // swapped, % to //,
int constants +1 and -1, ``and``/``or`` swapped, True/False flipped, ``not`` and unary minus dropped, min/max
swapped), a forked child of one warm process re-executes the mutated top-level function or class in its module,
rebinds every imported reference to it, and runs the target's fast test selection with pytest (``-x``, a
timeout). A mutant is *killed* when the tests fail, *survives* when they pass. Nothing is written to disk: the
source files are never changed. Error messages (``raise`` statements) and annotations are not mutated.

    python scripts/mutation_check.py                      # every target, the full selection
    python scripts/mutation_check.py --target segments --exclude tests/runtime/test_blind_spots.py --json out.json
    python scripts/mutation_check.py --rerun out.json     # only the survivors of an earlier run

Run on a CPU with one thread (torch.set_num_threads(1) is forced: on a shared CPU, two threads per tiny op
cost more than they give). Prints one line per survivor and a summary; ``--json`` keeps the full record.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, module, top-level names to mutate (None: every function and class), pytest selection)
TARGETS = {
    "segments": (
        "rmt_fast/segments.py",
        "rmt_fast.segments",
        None,
        [
            "tests/runtime/test_equivalence.py",
            "tests/runtime/test_attention_seam.py",
            "tests/runtime/test_errors.py",
            "tests/runtime/test_blind_spots.py",
            "tests/runtime/test_properties.py",
        ],
    ),
    "bptt_rule": (
        "rmt_fast/base.py",
        "rmt_fast.base",
        ["memory_detached_before"],
        [
            "tests/runtime/test_reference.py",
            "tests/runtime/test_equivalence.py::test_bptt_depth_matches_reference",
            "tests/runtime/test_blind_spots.py",
            "tests/runtime/test_properties.py",
        ],
    ),
    "input_checks": (
        "rmt_fast/input_checks.py",
        "rmt_fast.input_checks",
        None,
        [
            "tests/runtime/test_bad_input.py",
            "tests/runtime/test_errors.py",
            "tests/runtime/test_blind_spots.py",
            "tests/runtime/test_properties.py",
        ],
    ),
    "fast_launch": (
        "kernels/fast_launch.py",
        "rmt_fast.kernels.fast_launch",
        None,
        ["tests/kernels/test_fast_launch.py"],
    ),
    "launchers": (
        "kernels/triton_attention.py",
        "rmt_fast.kernels.triton_attention",
        ["_shape_plan", "_trusted", "_group", "_forward", "_backward", "_RmtAttentionFn", "rmt_attention"],
        ["tests/kernels/test_fast_launch.py", "tests/kernels/test_kernel_variants.py"],
    ),
    "layout": (
        "kernels/layout.py",
        "rmt_fast.kernels.layout",
        None,
        [
            "tests/kernels/test_layout.py",
            "tests/kernels/test_layout_mask_mod.py",
            "tests/runtime/test_attention_seam.py",
            "tests/project/test_layers.py",
            "tests/runtime/test_equivalence.py",
            "tests/runtime/test_blind_spots.py",
            "tests/runtime/test_properties.py",
        ],
    ),
}

_SWAP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.And: ast.Or,
    ast.Or: ast.And,
}


@dataclass
class Mutant:
    target: str
    index: int
    line: int
    what: str
    status: str = ""
    seconds: float = 0.0


def _skipped_nodes(tree) -> set[int]:
    """ids of nodes never mutated: raise statements (their messages) and annotations."""
    skip = set()
    for node in ast.walk(tree):
        roots = []
        if isinstance(node, ast.Raise):
            roots.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            roots.append(node.returns)
        if isinstance(node, ast.arg) and node.annotation is not None:
            roots.append(node.annotation)
        if isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
        for root in roots:
            skip.update(id(n) for n in ast.walk(root))
    return skip


def _sites(stmt, skip):
    """(node, field, index, replacement, description) for every mutation site of one top-level statement."""
    for node in ast.walk(stmt):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _SWAP:
                    yield node, "ops", i, _SWAP[type(op)](), f"{type(op).__name__} -> {_SWAP[type(op)].__name__}"
        elif isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)) and type(node.op) in _SWAP:
            swap = _SWAP[type(node.op)]
            yield node, "op", None, swap(), f"{type(node.op).__name__} -> {swap.__name__}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield node, "value", None, not node.value, f"{node.value} -> {not node.value}"
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, "value", None, node.value + 1, f"{node.value} -> {node.value + 1}"
            if node.value >= 1:
                yield node, "value", None, node.value - 1, f"{node.value} -> {node.value - 1}"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            yield node, "drop", None, None, f"drop unary {type(node.op).__name__}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            other = "max" if node.func.id == "min" else "min"
            yield node.func, "id", None, other, f"{node.func.id} -> {other}"


def _parse(target):
    path, _, names, _ = TARGETS[target]
    tree = ast.parse((ROOT / path).read_text())
    skip = _skipped_nodes(tree)
    stmts = [
        s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.ClassDef)) and (names is None or s.name in names)
    ]
    return tree, stmts, skip


def enumerate_mutants(target) -> list[Mutant]:
    _, stmts, skip = _parse(target)
    out = []
    for stmt in stmts:
        for node, _, _, _, what in _sites(stmt, skip):
            out.append(Mutant(target, len(out), getattr(node, "lineno", stmt.lineno), f"{stmt.name}: {what}"))
    return out


def _mutated_statement(target, index):
    """The top-level statement holding mutant ``index``, mutated, as a module ready to compile."""
    _, stmts, skip = _parse(target)
    k = 0
    for stmt in stmts:
        for node, field, i, new, _ in _sites(stmt, skip):
            if k == index:
                if field == "ops":
                    node.ops[i] = new
                elif field == "drop":
                    _replace_child(stmt, node, node.operand)
                else:
                    setattr(node, field, new)
                return stmt
            k += 1
    raise IndexError(index)


def _replace_child(root, old, new):
    for parent in ast.walk(root):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list):
                for j, item in enumerate(value):
                    if item is old:
                        value[j] = new
                        return
    raise ValueError("node not found")


def _install(target, index):
    """In this (child) process: run the mutated statement in its module and rebind every reference to it."""
    path, module_name, _, _ = TARGETS[target]
    module = importlib.import_module(module_name)  # the warm process may not have imported it yet
    stmt = _mutated_statement(target, index)
    old = module.__dict__[stmt.name]
    code = compile(ast.fix_missing_locations(ast.Module(body=[stmt], type_ignores=[])), str(ROOT / path), "exec")
    exec(code, module.__dict__)
    new = module.__dict__[stmt.name]
    for mod in list(sys.modules.values()):
        if mod is None or not getattr(mod, "__name__", "").startswith(("rmt_fast", "models", "test_")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)


def _run_child(target, index, tests, timeout) -> str:
    import pytest

    pid = os.fork()
    if pid == 0:
        status = 3
        try:
            if index is not None:
                _install(target, index)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            status = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]))
        finally:
            os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(code)
            return "survived" if code == 0 else ("killed" if code in (1, 2) else f"error (exit {code})")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "killed (timeout)"
        time.sleep(0.05)


def _warm():
    import torch

    if not torch.cuda.is_available():  # as tests/conftest.py: Triton reads this when the kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")

    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None  # tests/conftest.py asks for two threads: keep one
    sys.path.insert(0, str(ROOT / "tests"))
    import models  # noqa: F401
    import transformers  # noqa: F401

    import rmt_fast.fast  # noqa: F401
    import rmt_fast.reference  # noqa: F401


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--exclude", action="append", default=[], help="a test file left out of every selection")
    ap.add_argument("--only", action="append", default=[], help="run only these test files (of the selection)")
    ap.add_argument("--tests", action="append", default=[], help="replace every selection with these tests")
    ap.add_argument("--rerun", help="a JSON record: run only its survivors")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    ap.add_argument("--json", help="write the record here")
    ap.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.rerun:
        record = json.loads(Path(args.rerun).read_text())
        mutants = [Mutant(**{**m, "status": "", "seconds": 0.0}) for m in record if m["status"] == "survived"]
    else:
        mutants = [m for t in (args.target or sorted(TARGETS)) for m in enumerate_mutants(t)]
    if args.list:
        for m in mutants:
            print(f"{m.target}#{m.index} line {m.line}: {m.what}")
        print(len(mutants), "mutants")
        return 0
    _warm()
    from tqdm import tqdm

    def selection(target):
        tests = [t for t in args.tests or TARGETS[target][3] if t.split("::")[0] not in args.exclude]
        if args.only:
            tests = [t for t in tests if t.split("::")[0] in args.only]
        return tests

    for target in sorted({m.target for m in mutants}):  # the unmutated code must pass its selection
        base = _run_child(target, None, selection(target), args.timeout * 3)
        if base != "survived":
            sys.exit(f"{target}: the selection fails on the unmutated code ({base}): fix that first")
    for m in tqdm(mutants, desc="mutants", unit="mutant"):
        tests = selection(m.target)
        t0 = time.perf_counter()
        m.status = _run_child(m.target, m.index, tests, args.timeout) if tests else "survived"
        m.seconds = round(time.perf_counter() - t0, 2)
        if m.status == "survived" or m.status.startswith("error"):
            tqdm.write(f"{m.status.upper()} {m.target}#{m.index} {TARGETS[m.target][0]}:{m.line} {m.what}")
    summary: dict = {}
    for m in mutants:
        row = summary.setdefault(m.target, {"mutants": 0, "killed": 0, "survived": 0, "error": 0})
        row["mutants"] += 1
        row[m.status.split()[0]] += 1
    for target, row in summary.items():
        print(
            f"{target}: {row['mutants']} mutants, {row['killed']} killed, {row['survived']} survived, "
            f"{row['error']} errors (the mutant could not be installed)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(m) for m in mutants], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

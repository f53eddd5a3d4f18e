"""`rmt-fast-bench`: run the benchmarks.

    rmt-fast-bench flops          [--out DIR] [--quick]
    rmt-fast-bench latency        [--out DIR] [--quick]
    rmt-fast-bench profile        [--out DIR] [--quick]
    rmt-fast-bench kernels        [--out DIR] [--quick]   # GPU: Triton vs SDPA, and what `auto` picks
    rmt-fast-bench input-checks   [--out DIR] [--quick]   # cost of the input value checks per call
    rmt-fast-bench host-overhead  [--out DIR] [--quick]   # host time per attention call, Triton vs SDPA
    rmt-fast-bench tune           [--out DIR] [--quick] [--budget-s S] [--dry-run]   # GPU: the dispatch table
    rmt-fast-bench train          [--out DIR] [--quick] [--setting a,b|tiny] [--budget-s S]
    rmt-fast-bench cuda-graph     [--out DIR] [--quick] [--million]
    rmt-fast-bench train-memory   [--out DIR] [--quick]
    rmt-fast-bench compare        [--out DIR] [--quick]   # FastRMT vs ReferenceRMT on the CPU
    rmt-fast-bench armt           [--out DIR] [--quick]   # ARMT: sequential vs diagonal vs full attention
    rmt-fast-bench all            [--out DIR] [--quick]   # every available benchmark but those in NOT_IN_ALL,
                                                          # each in DIR/<name>/

Each benchmark is a module ``rmt_fast.bench.<name>`` (the ``benchmarks/`` folder) exposing
``run(out_dir: Path, quick: bool) -> dict``
(a flat-ish summary dict). Modules are imported lazily; one that does not exist yet is reported as
"not available yet" and skipped. To add a benchmark, add a line to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback
from pathlib import Path

from rmt_fast.bench.common import timestamp

BENCHMARKS: dict[str, str] = {
    "flops": "rmt_fast.bench.flops",
    "latency": "rmt_fast.bench.latency",
    "profile": "rmt_fast.bench.profile",
    "kernels": "rmt_fast.bench.kernels",
    "compare": "rmt_fast.bench.compare_cpu",
    "train-memory": "rmt_fast.bench.train_memory",
    "cuda-graph": "rmt_fast.bench.cuda_graph",
    "input-checks": "rmt_fast.bench.input_checks",
    "host-overhead": "rmt_fast.bench.host_overhead",
    "tune": "rmt_fast.bench.tune",
    "train": "rmt_fast.bench.train",
    "armt": "rmt_fast.bench.armt",
}
# Run only when asked for by name: too long for `all` on a 2-core CPU (compare ~10 min, train-memory ~4 min),
# or GPU-only (cuda-graph, tune), or long on a GPU (train: bert-base and a 1B decoder).
NOT_IN_ALL: frozenset[str] = frozenset({"train", "tune", "compare", "train-memory", "cuda-graph"})


def _available(module_path: str) -> bool:
    try:
        return importlib.util.find_spec(module_path) is not None
    except ModuleNotFoundError:
        return False


def run_one(name: str, out_dir: Path, quick: bool, extra: list[str] | None = None) -> dict:
    """Run benchmark `name`; returns {'name', 'status', 'seconds', 'summary', ...}. Never raises, but for bad
    options: ``extra`` (options beyond --out/--quick) go to the module's ``add_arguments(parser)`` and then
    ``run_args(out_dir, quick, namespace)``; a module without them refuses extra options."""
    module_path = BENCHMARKS[name]
    if not _available(module_path):
        print(f"[{name}] not available yet ({module_path} does not exist); skipping")
        return {"name": name, "status": "not available yet", "seconds": 0.0, "summary": {}}
    print(f"[{name}] running -> {out_dir}")
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(module_path)
        if extra:
            if not hasattr(module, "add_arguments"):
                raise SystemExit(f"rmt-fast-bench {name}: unrecognized arguments: {' '.join(extra)}")
            options = argparse.ArgumentParser(prog=f"rmt-fast-bench {name}")
            module.add_arguments(options)
            summary = module.run_args(Path(out_dir), quick, options.parse_args(extra)) or {}
        else:
            summary = module.run(Path(out_dir), quick=quick) or {}
        status = "ok"
        if summary.get("crosscheck_ok") is False or summary.get("ok") is False:
            status = "failed checks"
    except Exception as exc:  # keep going with the other benchmarks under `all`
        traceback.print_exc()
        summary, status = {"error": f"{type(exc).__name__}: {exc}"}, "error"
    return {"name": name, "status": status, "seconds": time.perf_counter() - t0, "summary": summary}


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{...}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def print_summary(results: list[dict]) -> None:
    """Plain-text table: benchmark, status, seconds, and the scalar entries of each summary."""
    print()
    print(f"{'benchmark':10s} {'status':18s} {'seconds':>8s}  key results")
    print("-" * 78)
    for res in results:
        items = [f"{k}={_short(v)}" for k, v in res["summary"].items() if not isinstance(v, (dict, list))]
        print(f"{res['name']:10s} {res['status']:18s} {res['seconds']:8.1f}  " + (items[0] if items else ""))
        for item in items[1:]:
            print(f"{'':39s}{item}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rmt-fast-bench", description="Benchmarks for rmt-fast.")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join([*BENCHMARKS, "all"]) + "}"
    )
    for name in [*BENCHMARKS, "all"]:
        p = sub.add_parser(
            name,
            help=f"run every available benchmark except {', '.join(sorted(NOT_IN_ALL))}" if name == "all"
            else f"{name} benchmark",
        )
        p.add_argument("--out", type=Path, default=None, help="output folder (default: results-<timestamp>)")
        p.add_argument("--quick", action="store_true", help="smaller, faster configuration")
    args, extra = parser.parse_known_args(argv)  # benchmark-specific options go to the module
    if extra and args.command == "all":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    out = args.out if args.out is not None else Path(f"results-{timestamp()}")

    if args.command == "all":
        results = [run_one(name, out / name, args.quick) for name in BENCHMARKS if name not in NOT_IN_ALL]
    else:
        results = [run_one(args.command, out, args.quick, extra)]
    print_summary(results)
    return 1 if any(r["status"] in ("error", "failed checks") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

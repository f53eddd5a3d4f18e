"""A/B of the Triton path's host time in one process: this checkout's kernels against another commit's, both imported
side by side (the other from ``git archive REV kernels`` under another package name), on ``host-overhead``'s stubs.

    python scripts/host_overhead_ab.py --before 6a3440c --rounds 60 --calls 200 --out DIR

Versions: ``before`` (the commit), ``after_run`` (this checkout with the fast launch off: a second copy of its
kernels whose ``fast_launch.ENABLED`` is False) and ``after``; SDPA's path (stubbed) beside them. Stubs: ``plain``
(kernel ``run`` a no-op: our Python only) and ``triton`` (Triton's own ``JITFunction.run``, or the fast launch, up
to a no-op low-level launch, with a fake driver); ``sdpa`` is SDPA's path with the view stub; ``sdpa_real`` the real
SDPA op at host-overhead's tiny shape (``TINY``, no stubs: SDPA's own host path with a negligible compute) and
``after_tiny`` this checkout's Triton path at the same shape (host-overhead's same-shape comparison). Calls:
``no_grad``, ``grad`` (inputs require grad), ``step`` (forward + ``autograd.grad``), the ``full`` case of host-
overhead (B = 2, 12 heads, T = 544, D = 64, fp16). Each round times ``--calls`` back-to-back calls of every
(version, call) in turn; per call the process CPU time, min and median over the rounds. Writes ``ab.json`` and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiled path: plans cached, real JITFunctions
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rmt_fast.bench import host_overhead as ho  # noqa: E402
from rmt_fast.kernels import launch_configs, sdpa_attention  # noqa: E402
from rmt_fast.kernels import triton_attention as ra  # noqa: E402


def _package(tmp: Path, name: str, source: Path | None, rev: str | None):
    """Import a copy of ``kernels/`` (from ``source`` or ``git archive rev``) as package ``name``."""
    target = tmp / name
    if rev is not None:
        data = subprocess.run(["git", "archive", rev, "kernels"], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp / f"{name}_src", filter="data")
        shutil.move(tmp / f"{name}_src" / "kernels", target)
    else:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "tuned"))
    (target / "__init__.py").write_text("")
    return importlib.import_module(f"{name}.triton_attention"), importlib.import_module(f"{name}.launch_configs")


def _stats(samples: list) -> dict:
    """The rounds' samples (CPU us per call) as the table shows them: min and median."""
    return {"min_us": round(min(samples), 2), "median_us": round(statistics.median(samples), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="folder for ab.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="host_overhead_ab_"))
    sys.path.insert(0, str(tmp))
    before = _package(tmp, "ab_before", None, args.before)
    after_run = _package(tmp, "ab_after_run", ROOT / "kernels", None)
    importlib.import_module("ab_after_run.fast_launch").ENABLED = False
    versions = {"before": before, "after_run": after_run, "after": (ra, launch_configs)}

    q, k, v, layout = ho.cases("cpu")["full"]
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    g_out = torch.ones(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)

    def calls(fn_nograd, fn_grad) -> dict:
        def step():
            torch.autograd.grad(fn_grad(), (qg, kg, vg), g_out, allow_unused=True)

        return {"no_grad": fn_nograd, "grad": fn_grad, "step": step}

    paths = {}
    for name, (mod, _) in versions.items():
        for call, fn in calls(
            lambda mod=mod: mod.rmt_attention(q, k, v, layout, check=False),
            lambda mod=mod: mod.rmt_attention(qg, kg, vg, layout, check=False),
        ).items():
            paths[(name, call)] = fn
    for call, fn in calls(
        lambda: sdpa_attention.sdpa_rmt_attention(q, k, v, layout),
        lambda: sdpa_attention.sdpa_rmt_attention(qg, kg, vg, layout),
    ).items():
        paths[("sdpa", call)] = fn

    # host-overhead's same-shape comparison (TINY): this checkout's Triton path and the real SDPA op (in place
    # around its own calls only), interleaved with the rest
    tiny = ho._tiny_paths(*ho.cases("cpu", **ho.TINY)["full"])
    for name, prefix in (("after_tiny", "triton_tiny"), ("sdpa_real", "sdpa_real")):
        for call, suffix in (("no_grad", ""), ("grad", "_grad"), ("step", "_step")):
            paths[(name, call)] = tiny[prefix + suffix]
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    results = {}
    for mode in ("plain", "triton"):
        with contextlib.ExitStack() as stack:
            for mod, cfg in versions.values():
                stack.enter_context(ho.stubs(mode, module=mod, cfg=cfg))
            samples = ho.interleaved_cpu_us(
                paths,
                args.rounds,
                args.calls,
                3,
                lambda key: key[1] == "no_grad",
                around=lambda key: ho._sdpa_for(key[0], real_sdpa),
            )
        for (name, call), s in samples.items():
            results[f"{mode} {name} {call}"] = _stats(s)

    cols = ["before", "after_run", "after", "sdpa", "after_tiny", "sdpa_real"]
    lines = [
        f"before = {args.before}; {args.rounds} rounds x {args.calls} calls; CPU us per call, median (min)",
        "",
        "| stub | call | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for mode in ("plain", "triton"):
        for call in ("no_grad", "grad", "step"):
            cells = [results[f"{mode} {c} {call}"] for c in cols]
            lines.append(
                f"| {mode} | {call} | " + " | ".join(f"{x['median_us']:.2f} ({x['min_us']:.2f})" for x in cells) + " |"
            )
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.json").write_text(
            json.dumps(
                {"before": args.before, "rounds": args.rounds, "calls": args.calls, "results": results}, indent=1
            )
            + "\n"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

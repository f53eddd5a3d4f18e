"""Static evidence for the Triton attention kernels without a GPU: compile every kernel variant and launch
configuration that ``rmt-fast-bench tune`` may pick for sm_90 (Triton's compiler and the ptxas / cuobjdump in its
wheel, as tests/kernel_compile.py does) and report, per compiled kernel: registers per thread, spill stores and
loads, stack frame, shared memory, and the Hopper matrix instructions (``wgmma.mma_async`` in the PTX, ``HGMMA``
in the SASS) against the Ampere-style ``mma.sync`` / ``HMMA`` ones.

    python scripts/kernel_report.py [--grid full|quick|heuristic] [--dtypes fp16] [--head-dims 64,128]
                                    [--jobs 1] [--out kernels/tuned]

writes ``<out>/sm90.json`` (one record per kernel, with its ``problems`` and ``notes``) and ``<out>/sm90.md`` (a
short table); ``--out`` defaults to ``kernels/tuned/static/`` (beside, not among, the dispatch tables). A record's
problems: register spills; a 2-byte dtype on sm_90 with no wgmma at all (every config ``tune`` may pick should
keep the tensor cores' Hopper path); shared memory over the sm_90 opt-in limit. Some dots on ``mma.sync`` beside
wgmma (a tile under 64 rows per warpgroup) is a note. ``tune_plan.candidates`` drops configurations the committed
report flags.

Layouts compiled (:data:`LAYOUTS`): every candidate causal and padded by token counts (the layout tune sweeps);
the built-in defaults also padded by token runs. No dropout; float scalars fp32 (the eager launcher).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
if __name__ == "__main__":  # compiling needs the real compiler; an importer (the tests) keeps its interpreter
    os.environ.pop("TRITON_INTERPRET", None)

ARCH = 90
SMEM_LIMIT = 232448  # sm_90 opt-in shared memory per block (bytes)
# The layouts compiled: every candidate in the one tune sweeps (causal, padded by token counts: right padding,
# what FastRMT's segments have); the built-in defaults also with token runs (left and right padding: the third
# key range the kernels loop over, so more code and registers).
LAYOUTS = {
    "causal+counts": dict(CAUSAL=True, PADDED=True, HAS_STARTS=False, DROPOUT=False),
    "causal+runs": dict(CAUSAL=True, PADDED=True, HAS_STARTS=True, DROPOUT=False),
}
_KINDS = ("fwd", "dq", "dkdv")


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def wgmma_expected(dtype: str) -> bool:
    """fp16 / bf16 dots on sm_90 should run on wgmma (fp32 runs exact IEEE dots on FMA units or TF32)."""
    return dtype in ("fp16", "bf16")


def problems(rec: dict) -> list[str]:
    """What is wrong with a compiled kernel record (empty: fine)."""
    out = []
    if rec.get("error"):
        return [f"compile error: {rec['error']}"]
    spilled = (rec.get("spill_stores") or 0) + (rec.get("spill_loads") or 0)
    if spilled or (rec.get("spill_stores") is None and rec.get("stack", 0) > 0):
        out.append(
            f"register spills: {rec.get('spill_stores')} B stored, {rec.get('spill_loads')} B loaded, "
            f"{rec.get('stack')} B stack, {rec.get('regs')} registers"
        )
    if rec["wgmma_expected"] and rec["wgmma"] == 0:
        out.append(f"no wgmma: {rec['mma_sync']} mma.sync")
    if rec.get("shared", 0) > SMEM_LIMIT:
        out.append(f"shared memory {rec['shared']} B > {SMEM_LIMIT} B")
    return out


def analyse(kind: str, dtype: str, head_dim: int, cfg, layout: str = "causal+counts") -> dict:
    """Compile one kernel for sm_90 and measure it (a record; ``problems`` filled in)."""
    import kernel_compile
    import triton

    from rmt_fast.kernels.launch_configs import LaunchConfig

    cfg = LaunchConfig.of(cfg)
    rec = dict(
        kind=kind,
        variant=cfg.variant,
        dtype=dtype,
        head_dim=head_dim,
        layout=layout,
        block_m=cfg.block_m,
        block_n=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        config=list(cfg.as_tuple()),
        wgmma_expected=wgmma_expected(dtype),
    )
    t0 = time.perf_counter()
    log = io.StringIO()
    old = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed on a cache miss
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel_compile.compile_variant(kind, dtype, LAYOUTS[layout], ARCH, "fp32", head_dim, cfg)
    except Exception as exc:  # a config that does not compile is a finding, not a crash
        rec.update(error=f"{type(exc).__name__}: {str(exc)[-300:]}".replace("\n", " "), wgmma=0, mma_sync=0)
        rec["problems"] = problems(rec)
        return rec
    finally:
        triton.knobs.nvidia.dump_ptxas_log = old
    rec["compile_s"] = round(time.perf_counter() - t0, 1)
    ptx = compiled.asm["ptx"]
    rec["wgmma"] = ptx.count("wgmma.mma_async")
    rec["mma_sync"] = len(re.findall(r"\bmma\.sync\b", ptx))
    rec["shared"] = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    rec["regs"], rec["stack"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    rec["sass_hgmma"] = sass.count("HGMMA")
    rec["sass_hmma"] = len(re.findall(r"\bHMMA\b", sass))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    rec["spill_stores"], rec["spill_loads"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    rec["problems"] = problems(rec)
    rec["notes"] = (
        [f"{rec['mma_sync']} dots on mma.sync beside {rec['wgmma']} wgmma"]
        if (rec["wgmma_expected"] and rec["wgmma"] and rec["mma_sync"])
        else []
    )
    return rec


def plan(grid: str, dtypes: tuple[str, ...], head_dims: tuple[int, ...]) -> list[tuple]:
    """(kind, dtype, head_dim, config) for every config ``tune`` may pick on sm_90 (``grid``: the full or the
    quick sweep's candidates; ``heuristic``: the built-in defaults only) and every variant of each."""
    from rmt_fast.bench import tune_plan

    jobs = []
    for dtype in dtypes:
        for d in head_dims:
            for kind in _KINDS:
                base = tune_plan.heuristic_config(kind, d, {"fp16": "float16", "bf16": "bfloat16"}[dtype])[:4]
                defaults = [base if v == "fa2" else (*base, v) for v in tune_plan.VARIANT_GRID[kind]]
                cands = defaults
                if grid != "heuristic":
                    cands, _ = tune_plan.candidates(kind, d, grid == "quick", SMEM_LIMIT, static=False)
                jobs += [(kind, dtype, d, tuple(c), "causal+counts") for c in cands]
                jobs += [(kind, dtype, d, tuple(c), "causal+runs") for c in defaults]
    return list(dict.fromkeys(jobs))


def markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"# Static report: Triton attention kernels compiled for sm_{ARCH} (no GPU)",
        "",
        f"Written by `python scripts/kernel_report.py {meta['args']}` (git {meta['git_sha']}, triton "
        f"{meta['triton']}){_merged_text(meta)}. Layouts: causal padded by token counts (every candidate) and "
        "by token runs (the defaults). `wgmma`: Hopper "
        "matrix instructions in the PTX (`mma.sync`: the Ampere path); regs per thread, spills and stack from "
        "ptxas / cuobjdump; shared memory from Triton. The JSON beside this file has every record.",
        "",
        f"{meta['n']} kernels, {meta['n_problems']} with problems (`tune_plan.candidates` skips those).",
        "",
        "| kind | variant | dtype | D | layout | config | regs | spills (B) | smem (KiB) | wgmma | mma.sync "
        "| problems |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        cfg = f"{r['block_m']}x{r['block_n']} w{r['num_warps']} s{r['num_stages']}"
        spills = "?" if r.get("spill_stores") is None else r["spill_stores"] + r["spill_loads"]
        lines.append(
            f"| {r['kind']} | {r['variant']} | {r['dtype']} | {r['head_dim']} | {r['layout']} | {cfg} | "
            f"{r.get('regs', '')} | "
            f"{spills} | {r.get('shared', 0) / 1024:.0f} | {r['wgmma']} | {r['mma_sync']} | "
            f"{'; '.join(r['problems'] + r.get('notes', [])) or 'ok'} |"
        )
    return "\n".join(lines) + "\n"


def _merged_text(meta: dict) -> str:
    runs = [f"`{m['args']}` (git {m['git_sha']})" for m in meta.get("merged_into", [])]
    return ", updating the records of " + ", ".join(runs) if runs else ""


def _key(rec: dict) -> tuple:
    return (rec["kind"], rec["dtype"], rec["head_dim"], rec["layout"], tuple(rec["config"]))


def _job(args):
    return analyse(*args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--grid",
        choices=("full", "quick", "heuristic"),
        default="full",
        help="the configs: tune's full or quick candidates, or the built-in defaults only",
    )
    p.add_argument("--dtypes", default="fp16")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "kernels" / "tuned" / "static"))
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the records of the existing report and replace or add only the ones compiled now",
    )
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    jobs = plan(args.grid, tuple(args.dtypes.split(",")), tuple(int(d) for d in args.head_dims.split(",")))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # cold: every compile runs ptxas, whose log has the spills
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                records = list(tqdm(pool.map(_job, jobs), total=len(jobs), desc="kernel report", unit="kernel"))
        else:
            records = [analyse(*j) for j in tqdm(jobs, desc="kernel report", unit="kernel")]
    import triton

    out = Path(args.out)
    merged_into = []
    if args.merge and (out / f"sm{ARCH}.json").exists():
        old = json.loads((out / f"sm{ARCH}.json").read_text())
        fresh = {_key(r) for r in records}
        records = [r for r in old["records"] if _key(r) not in fresh] + records
        merged_into = [old["meta"], *old["meta"].get("merged_into", [])]  # the runs this one updates
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    meta = dict(
        arch=f"sm{ARCH}",
        args=argv_text,
        git_sha=sha.strip(),
        triton=triton.__version__,
        layouts=LAYOUTS,
        smem_limit=SMEM_LIMIT,
        n=len(records),
        n_problems=sum(bool(r["problems"]) for r in records),
        seconds=round(time.perf_counter() - t0, 1),
    )
    if args.merge and merged_into:
        meta["merged_into"] = [{k: v for k, v in m.items() if k != "merged_into"} for m in merged_into]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sm{ARCH}.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    (out / f"sm{ARCH}.md").write_text(markdown(records, meta))
    print(f"{len(records)} kernels, {meta['n_problems']} with problems, {meta['seconds']}s -> {out}/sm{ARCH}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())

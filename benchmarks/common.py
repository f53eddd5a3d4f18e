"""Records shared by the benchmarks: the environment description, CSV/JSON writers, plot saving, peak memory,
a point in a fresh process, the kernel benchmarks' segment layout.

Kept free of heavy imports at module level (matplotlib and transformers are imported lazily) so that
``rmt-fast-bench --help`` and the analytic parts of the benchmarks start quickly.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def package_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (None when absent)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else platform.processor(), else 'unknown CPU'."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name() -> tuple[str, str]:
    """(kind, name): ('GPU', CUDA device name) when CUDA is usable, else ('CPU', cpu_name())."""
    try:
        import torch

        if torch.cuda.is_available():
            return "GPU", torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # torch missing or a broken CUDA setup: describe the CPU instead
        pass
    return "CPU", cpu_name()


def machine_label() -> str:
    """Short label for plot titles, e.g. 'CPU: AMD EPYC' or 'GPU: NVIDIA H100 80GB HBM3'."""
    kind, name = device_name()
    return f"{kind}: {name}"


def git_sha(root: Path = REPO_ROOT) -> str:
    """Commit of the checkout (``git rev-parse HEAD``); 'unknown' without git or outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def env_info() -> dict[str, Any]:
    """Describe the machine and software stack a benchmark ran on (written next to its results)."""
    kind, name = device_name()
    try:
        import torch

        torch_version = torch.__version__
        cuda_version = torch.version.cuda
        num_threads = torch.get_num_threads()
    except ImportError:
        torch_version = cuda_version = num_threads = None
    return {
        "device_kind": kind,
        "device_name": name,
        "machine_label": f"{kind}: {name}",
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": num_threads,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch_version,
        "cuda": cuda_version,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write dict rows as CSV. Columns: union of keys in first-seen order; missing values stay empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        for key in row:
            if key not in fields:
                fields.append(key)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON (non-JSON values such as Paths are stringified)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(
    ax,
    rows: list[dict],
    x: str,
    y: str,
    by: str | None = None,
    *,
    labels: dict | None = None,
    xlog: int = 2,
    ylog: bool = True,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
):
    """``y`` against ``x`` on ``ax``, one line per value of the column ``by`` (first seen first; ``labels`` renames
    them), from the ``ok`` rows that have both values; log axes (``xlog``: the base of x, 0 for linear), grid, and
    a legend when there is more than one line or a named one."""
    groups: dict = {}
    for r in rows:
        if r.get("status", "ok") == "ok" and r.get(x) is not None and r.get(y) is not None:
            groups.setdefault(r[by] if by else None, []).append((r[x], r[y]))
    for key, pts in groups.items():
        ax.plot(*zip(*sorted(pts)), marker="o", ms=4, label=(labels or {}).get(key, key))
    if xlog:
        ax.set_xscale("log", base=xlog)
    if ylog:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if by and groups:
        ax.legend(fontsize=8)


def save_plot(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure with tight layout at 120 dpi, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        pyplot().close(fig)
    return path


def timestamp() -> str:
    """Local time as YYYYmmdd-HHMMSS (used for default output folders)."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


# ------------------------------------------------------------------------------------------- peak memory
def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory added while some code runs: ``token = pm.start(); ...; pm.mb(token)``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: growth of the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) over the resident set at ``start``; memory the allocator
    already holds is not counted again, so it is a lower bound. None where /proc is not writable."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return None
        return _proc_status_kb("VmRSS")

    def mb(self, token) -> float | None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _proc_status_kb("VmHWM")
        return None if token is None or hwm is None else max(hwm - token, 0) / 1024


def run_point_in_subprocess(fn, timeout: float | None = None, **kwargs) -> dict:
    """``fn(**kwargs)`` (a module-level function returning a JSON-able dict) in a fresh process, one torch thread.

    For CPU peak-memory points: a fresh process has no allocator cache from earlier work, and glibc's mmap
    threshold is set to 64 KiB so that freed tensors leave the resident set at once and the resident-set peak
    follows live tensors rather than heap fragmentation. Raises RuntimeError with the tail of stderr on failure.
    """
    cmd = [sys.executable, "-m", "rmt_fast.bench.common", f"{fn.__module__}:{fn.__name__}", json.dumps(kwargs)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{fn.__name__}({kwargs}) failed: {done.stderr[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_layout(
    B: int, T: int, *, causal: bool = True, padded: bool = True, device="cpu", seed: int = 0, mem: int = 10
):
    """The segment layout the kernel benchmarks time, T positions in all: causal is the decoder's
    ``[mem read | T - 2 mem tokens | mem write]``, bidirectional the encoder's (tokens only); ``padded`` rows
    hold between 75 % and all of the token slots (row 0 full), drawn from ``seed``."""
    import torch

    from rmt_fast.kernels.layout import SegmentLayout

    read, tokens, write = (mem, T - 2 * mem, mem) if causal else (0, T, 0)
    counts = None
    if padded:
        g = torch.Generator().manual_seed(seed)
        counts = torch.randint(int(tokens * 0.75), tokens + 1, (B,), generator=g)
        counts[0] = tokens
        counts = counts.to(device=device, dtype=torch.int32)
    return SegmentLayout(read, tokens, write, causal, token_counts=counts)


def attention_step(mode: str, fn, q, k, v, do=None):
    """A zero-argument call of the attention ``fn(q, k, v)`` for the kernel benchmarks: ``"fwd"`` (no grad),
    ``"fwd+bwd"`` (forward and the three input gradients), ``"dq"`` / ``"dkdv"`` (forward and that backward only);
    ``do``: the output gradient (random when None)."""
    import torch

    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return fn(q, k, v)

        return fwd
    need = (mode != "dkdv", mode != "dq", mode != "dq")  # q, k, v
    qg, kg, vg = (t.detach().requires_grad_(r) for t, r in zip((q, k, v), need))
    wrt = [t for t in (qg, kg, vg) if t.requires_grad]
    do = torch.randn_like(fn(qg, kg, vg)) if do is None else do
    return lambda: torch.autograd.grad(fn(qg, kg, vg), wrt, do)


if __name__ == "__main__":  # run_point_in_subprocess: MODULE:FUNCTION JSON-KWARGS -> the result as one JSON line
    import importlib

    import torch

    torch.set_num_threads(1)
    target, kwargs = sys.argv[1], json.loads(sys.argv[2])
    module_name, _, function = target.partition(":")
    print(json.dumps(getattr(importlib.import_module(module_name), function)(**kwargs)))

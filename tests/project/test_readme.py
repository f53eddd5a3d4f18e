"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh Python process.

A block whose first line is ``# gpu-only`` is skipped without CUDA. Each block's run time and peak resident
memory are measured in its process; ``python tests/project/test_readme.py`` prints them as a table.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
DOCS = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
GPU_ONLY = "# gpu-only"
TIMEOUT_S = 600
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_STATS = "README_BLOCK_STATS "

# Runs one block in a fresh namespace and reports its wall time, the process's CPU time (imports included) and
# its peak RSS (MB).
_RUNNER = f"""
import json, resource, sys, time
source = sys.stdin.read()
start = time.perf_counter()
exec(compile(source, sys.argv[1], "exec"), {{"__name__": "__main__"}})
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
stats = {{"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
         "peak_rss_mb": round(usage.ru_maxrss / 1024)}}
print({_STATS!r} + json.dumps(stats), file=sys.stderr)
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, dedented source) of every ```python block in ``text``."""
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, textwrap.dedent(match.group("body"))))
    return blocks


def run_block(source: str, name: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run ``source`` in a fresh interpreter (cwd: the repository root, one thread per library)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "2"),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, name],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=TIMEOUT_S,
    )
    stats = None
    for line in proc.stderr.splitlines():
        if line.startswith(_STATS):
            stats = json.loads(line[len(_STATS) :])
    return proc, stats


def _check(source: str, name: str) -> dict:
    proc, stats = run_block(source, name)
    assert proc.returncode == 0, f"{name} raised:\n{proc.stderr[-4000:]}"
    assert stats is not None, f"{name}: no statistics line:\n{proc.stderr[-2000:]}"
    return stats


def _blocks() -> list[tuple[str, int, str]]:
    """(file relative to the root, line, source) of every python block of README.md and docs/*.md."""
    blocks = []
    for path in DOCS:
        with open(path) as f:
            blocks += [(os.path.relpath(path, ROOT), line, src) for line, src in python_blocks(f.read())]
    return blocks


BLOCKS = _blocks()


def test_readme_and_docs_have_python_blocks():
    files = {name for name, _, _ in BLOCKS}
    assert "README.md" in files, "README.md: expected the Quickstart block"
    assert {"docs/usage.md", "docs/training.md", "docs/stream.md"} <= files, sorted(files)


@pytest.mark.slow
@pytest.mark.parametrize("name,line,source", BLOCKS, ids=[f"{name}:{line}" for name, line, _ in BLOCKS])
def test_readme_block_runs(name, line, source):
    if source.lstrip().startswith(GPU_ONLY) and not torch.cuda.is_available():
        pytest.skip("a GPU-only block")
    stats = _check(source, f"{name}:{line}")
    print(f"{name}:{line}: {stats}")


def test_harness_finds_indented_blocks_and_reports_failures():
    """The extraction and the runner themselves: a failing block fails, a good one passes, the gpu marker is
    recognised, blocks nested in a list are dedented."""
    text = (
        "intro\n```python\nx = 1\nprint(x)\n```\n- item\n  ```python\n  y = undefined_name\n  ```\n"
        "```bash\necho no\n```\n```python\n# gpu-only\nimport torch\n```\n"
    )
    blocks = python_blocks(text)
    assert [line for line, _ in blocks] == [2, 7, 13]
    assert blocks[1][1] == "y = undefined_name\n"
    assert blocks[2][1].startswith(GPU_ONLY)
    assert _check(blocks[0][1], "good")["wall_s"] >= 0
    with pytest.raises(AssertionError, match="NameError"):
        _check(blocks[1][1], "bad")


if __name__ == "__main__":  # a table of every block's time and peak memory
    for name, line, source in BLOCKS:
        if source.lstrip().startswith(GPU_ONLY) and not torch.cuda.is_available():
            print(f"{name}:{line}: skipped (gpu-only)")
            continue
        proc, stats = run_block(source, f"{name}:{line}")
        status = "ok" if proc.returncode == 0 else "FAILED:\n" + proc.stderr[-2000:]
        print(f"{name}:{line}: {stats} {status}", flush=True)

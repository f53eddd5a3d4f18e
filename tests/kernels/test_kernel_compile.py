"""The Triton kernels compile for Hopper (sm_90) on this CPU-only machine: Triton's compiler and the ptxas shipped
in its wheel, no GPU (tests/kernel_compile.py). The interpreter runs the kernels' logic; only the compiler sees
their types, argument lists and resource use. Both kinds of float scalar arguments are compiled: fp32 (the eager
launcher) and fp64 (what inductor passes through the torch.compile path)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
HERE = Path(__file__).resolve().parents[1]  # tests/


def _ptxas_available() -> bool:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")


@pytest.mark.parametrize("floats,dtypes", [("fp32", None), ("fp64", "fp16")])
def test_kernels_compile_for_sm90(tmp_path, floats, dtypes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # cold: really compile
    cmd = [sys.executable, str(HERE / "kernel_compile.py"), "--arch", "90", "--floats", floats]
    if dtypes:
        cmd += ["--dtypes", dtypes]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert last.startswith("compiled ") and ", 0 failed" in last, last
    assert int(last.split()[1]) >= 14, last

"""benchmarks/device_check.sh, the one command a lent GPU gets, dry-run on the CPU: every step runs (the GPU
benchmarks say they need CUDA and exit cleanly), the summary lists every step, the total-time guard skips what
would overrun, and the results are packed into one archive for the device tool's $OUT."""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tune", "tests", "kernels", "train", "million", "latency", "armt", "compile_tests", "host_overhead",
         "input_checks", "profile")


def _run(tmp_path, total_s: int):
    out, res = tmp_path / "out", tmp_path / "res" / "run"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), TOTAL_S=str(total_s), DEVICE_CHECK_SKIP_INSTALL="1")
    env.pop("TRITON_INTERPRET", None)  # as on the GPU machine: the inner pytest decides for itself
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(res)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = (res / "summary.txt").read_text()
    status = {}
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in STEPS:
            status[parts[0]] = parts[1]
    return out, res, summary, status, done.stdout


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_device_check_dry_run_on_cpu(tmp_path):
    out, res, summary, status, _ = _run(tmp_path, total_s=480)
    assert set(status) == set(STEPS), summary
    assert all(s == "ok" for s in status.values()), summary
    for name in STEPS:
        assert (res / f"{name}.log").is_file(), name
    assert (res / "train" / "train.csv").is_file() and (res / "env.txt").is_file()
    assert (res / "latency" / "latency.csv").is_file() and (res / "armt" / "armt.csv").is_file()
    with tarfile.open(out / "device_check.tar.gz") as tar:
        names = tar.getnames()
    assert "run/summary.txt" in names and "run/train/train.csv" in names, names[:20]
    assert (out / "summary.txt").is_file()


def test_device_check_total_time_guard(tmp_path):
    """With a 50 s total, a step is skipped (and recorded) exactly when its limit, from the second it would start,
    ends past the total; the steps whose limit alone is over 50 s never run. (Which of the short steps fit
    depends on how fast the machine gets there: the rule is checked, not the timing.)"""
    _, _, summary, status, stdout = _run(tmp_path, total_s=50)
    starts = {}
    for line in stdout.splitlines():  # "=== NAME at Ns skipped: its limit Ls ..." / "=== NAME at Ns (timeout Ls): ..."
        words = line.split()
        if line.startswith("=== ") and words[1] in STEPS and words[2] == "at":
            limit = words[7] if words[4] == "skipped:" else words[5]
            starts[words[1]] = (int(words[3].rstrip("s")), int(limit.strip("(s):")))
    assert set(starts) == set(STEPS) == set(status), stdout[-3000:]
    for name, (at, limit) in starts.items():
        assert (status[name] == "skipped") == (at + limit > 50), (name, at, limit, summary)
    assert all(status[s] == "skipped" for s in ("tune", "tests", "train", "armt", "compile_tests")), summary
    assert any(s != "skipped" for s in status.values()), summary

"""benchmarks/device_check.sh, the one command a lent GPU gets, dry-run on the CPU: every step runs (the GPU
benchmarks say they need CUDA and exit cleanly), the summary lists every step, the total-time guard skips what
would overrun, and the results come back as ONE archive in the device tool's $OUT. The step lines themselves:
in order of value, and their limits within the 540 s total."""

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
TOTAL_S = 540
GUARD_S = 60  # the guard test's total: compile_tests (50 s) fits from the start, tests and tune do not
STEP_LINE = re.compile(r"^(?:\[.*\] && )?step\s+(\w+)\s+(\d+)\s", re.M)


def _limits() -> dict[str, int]:
    """NAME -> limit (s) of every `step NAME LIMIT ...` line, in script order."""
    return {name: int(limit) for name, limit in STEP_LINE.findall(SCRIPT.read_text())}


STEPS = tuple(name for name in _limits() if name != "install")  # the dry run skips the install


def _run(tmp_path, total_s: int, scale: int = 1):
    """Run the script with TOTAL_S=total_s and every limit times ``scale`` (on a busy CPU, Python's start-up
    alone can take most of a GPU step's limit: the dry run checks that every step runs, not its time)."""
    out, res = tmp_path / "out", tmp_path / "res" / "run"
    out.mkdir()
    env = dict(
        os.environ,
        OUT=str(out),
        TOTAL_S=str(total_s),
        DEVICE_CHECK_SKIP_INSTALL="1",
        DEVICE_CHECK_LIMIT_SCALE=str(scale),
    )
    env.pop("TRITON_INTERPRET", None)  # as on the GPU machine: the inner pytest decides for itself
    done = subprocess.run(
        ["bash", str(SCRIPT), str(res)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = (res / "summary.txt").read_text()
    status = {}
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in STEPS:
            status[parts[0]] = parts[1]
    return out, res, summary, status, done.stdout


FIRST_CALL = ["install", "tests", "compile_tests", "tune", "million", "armt", "eval_stream", "latency"]
SECOND_CALL = ["train", "host_overhead", "kernels"]  # DEVICE_CHECK_STEPS=... on the warm machine, 240 s


def test_steps_in_order_of_value_within_the_total():
    """Correctness first (the GPU tests, then tune), then million, armt, the stream, latency: the first call's
    limits fit 540 s; train, host time and the kernels benchmark fit a second call of 240 s; the step limits
    follow the measured times."""
    limits = _limits()
    order = list(limits)
    assert order[: len(FIRST_CALL) + len(SECOND_CALL)] == FIRST_CALL + SECOND_CALL, order
    assert sum(limits[n] for n in FIRST_CALL) <= TOTAL_S, limits
    assert sum(limits[n] for n in SECOND_CALL) <= 240, limits
    assert limits["tests"] > 110 and limits["million"] > 50, limits  # cold compilation: over the cold times
    assert re.search(r"TOTAL=\$\{TOTAL_S:-540\}", SCRIPT.read_text())


def test_compile_tests_write_their_diagnosis_into_the_results():
    """The compiled-step GPU test writes tests/compile_diag.py's JSON into $RMT_FAST_DIAG_DIR: set, under the results
    folder (so it is packed), before the compile_tests step."""
    text = SCRIPT.read_text()
    export = text.index('export RMT_FAST_DIAG_DIR="$RES/compile_diag"')
    assert export < text.index("step compile_tests"), "RMT_FAST_DIAG_DIR must be set before the compile tests"


def test_a_selection_runs_only_the_named_steps(tmp_path):
    """DEVICE_CHECK_STEPS (the second call) runs exactly the named steps, in script order."""
    out, res = tmp_path / "out", tmp_path / "res"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), DEVICE_CHECK_SKIP_INSTALL="1", DEVICE_CHECK_STEPS="host_overhead,latency")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        ["bash", str(SCRIPT), str(res)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ran = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("=== ")]
    assert ran == ["latency", "host_overhead"], done.stdout[-2000:]
    assert (out / "device_check.tar.gz").is_file()


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_device_check_dry_run_on_cpu(tmp_path):
    out, res, summary, status, _ = _run(tmp_path, total_s=TOTAL_S, scale=4)
    assert set(status) == set(STEPS), summary
    assert all(s == "ok" for s in status.values()), summary
    for name in STEPS:
        assert (res / f"{name}.log").is_file(), name
    assert (res / "train" / "train.csv").is_file() and (res / "env.txt").is_file()
    assert (res / "latency" / "latency.csv").is_file() and (res / "armt" / "armt.csv").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["device_check.tar.gz"]  # ONE archive comes back
    with tarfile.open(out / "device_check.tar.gz") as tar:
        names = tar.getnames()
    assert "run/summary.txt" in names and "run/train/train.csv" in names, names[:20]
    assert "run/latency/latency.csv" in names and "run/tests.log" in names, names[:20]


def test_device_check_total_time_guard(tmp_path):
    """With a 60 s total, a step is skipped (and recorded) exactly when its limit, from the second it would start,
    ends past the total; the steps whose limit alone is over the total never run. (Which of the short steps fit
    depends on how fast the machine gets there: the rule is checked, not the timing.) The archive holds what
    ran."""
    out, _, summary, status, stdout = _run(tmp_path, total_s=GUARD_S)
    starts = {}
    for line in stdout.splitlines():  # "=== NAME at Ns skipped: its limit Ls ..." / "=== NAME at Ns (timeout Ls): ..."
        words = line.split()
        if line.startswith("=== ") and words[1] in STEPS and words[2] == "at":
            limit = words[7] if words[4] == "skipped:" else words[5]
            starts[words[1]] = (int(words[3].rstrip("s")), int(limit.strip("(s):")))
    assert set(starts) == set(STEPS) == set(status), stdout[-3000:]
    for name, (at, limit) in starts.items():
        assert (status[name] == "skipped") == (at + limit > GUARD_S), (name, at, limit, summary)
    long_steps = [n for n, limit in _limits().items() if limit > GUARD_S and n in STEPS]
    assert long_steps and all(status[s] == "skipped" for s in long_steps), summary
    assert any(s != "skipped" for s in status.values()), summary
    assert (out / "device_check.tar.gz").is_file()

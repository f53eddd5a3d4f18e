"""Nothing at the repository root hides an installed package (issue: transformers 5.25 requires Hugging Face's
`kernels`, and a regular ``kernels/`` package at the root shadowed it for everything run from the root).

Every check runs in a fresh subprocess whose working directory is the repository root, with the root first on
``sys.path`` as ``python -m pytest``, ``python -c``, a notebook or an example script that inserts it would have it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT_FOLDERS = ("kernels", "benchmarks", "tests", "examples", "scripts", "docs")


def _run(code: str, *, pythonpath: list[str] | None = None, timeout: float = 240) -> dict:
    """Run ``code`` with the repository root as the working directory and first on sys.path; it prints one JSON
    line last, which is returned."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env.setdefault("OMP_NUM_THREADS", "1")
    prelude = f"import sys\nsys.path.insert(0, {ROOT!r})\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hf_kernels_file() -> str | None:
    """The installed Hugging Face `kernels` package's __init__.py, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = dist.locate_file("kernels/__init__.py")
    return str(path) if os.path.exists(path) else None


def test_no_root_folder_is_a_regular_package():
    """A folder at the root with an __init__.py wins over any installed package of its name; a namespace
    portion (no __init__.py) loses to every installed regular package, so none of them may have one."""
    regular = [name for name in ROOT_FOLDERS if os.path.exists(os.path.join(ROOT, name, "__init__.py"))]
    assert regular == [], f"root folders that would shadow an installed package of the same name: {regular}"


@pytest.mark.parametrize("name", ["kernels", "benchmarks"])
def test_installed_regular_package_wins_over_the_root_folder(tmp_path, name):
    """A stand-in regular package in a temporary site folder, after the root on sys.path, is what imports."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("STAND_IN = True\n")
    got = _run(
        f"""
        import json, {name}
        print(json.dumps({{"file": getattr({name}, "__file__", None), "stand_in": getattr({name}, "STAND_IN", False),
                          "path0": sys.path[0]}}))
    """,
        pythonpath=[str(site)],
    )
    assert got["path0"] == ROOT
    assert got["stand_in"] is True and got["file"] == str(site / name / "__init__.py"), got


def test_the_package_still_imports_its_kernels_and_benchmarks_from_the_root():
    """rmt_fast.kernels / rmt_fast.bench resolve to this checkout's kernels/ and benchmarks/ (through the
    rmt_fast/kernels and rmt_fast/bench links), with or without another `kernels` installed."""
    got = _run("""
        import json
        import rmt_fast, rmt_fast.kernels.layout as layout, rmt_fast.bench.runner as runner
        from rmt_fast import SegmentLayout
        print(json.dumps({"rmt_fast": rmt_fast.__file__, "layout": layout.__file__, "runner": runner.__file__,
                          "same": SegmentLayout is layout.SegmentLayout}))
    """)
    assert got["rmt_fast"] == os.path.join(ROOT, "rmt_fast", "__init__.py")
    assert os.path.realpath(got["layout"]) == os.path.join(ROOT, "kernels", "layout.py")
    assert os.path.realpath(got["runner"]) == os.path.join(ROOT, "benchmarks", "runner.py")
    assert got["same"]


_FORWARD = """
    import json, torch, transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    from rmt_fast import FastRMT
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    rmt = FastRMT(model, num_mem_tokens=2, segment_size=8).eval()
    ids = torch.randint(0, 64, (2, 19))
    out = rmt(ids, labels=ids)
    import transformers.integrations.hub_kernels  # what transformers 5.25 imports from `kernels`
    import kernels
    print(json.dumps({"kernels": getattr(kernels, "__file__", None), "loss": float(out.loss),
                      "available": transformers.utils.import_utils.is_kernels_available()}))
"""


def test_hugging_face_kernels_imports_from_the_root_and_fastrmt_runs():
    """The real package, where installed (transformers >= 5.25 requires it): `import kernels` is Hugging Face's,
    transformers' hub-kernels integration imports, and a FastRMT forward runs."""
    hf = _hf_kernels_file()
    if hf is None:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers < 5.25 does not require it)")
    got = _run(_FORWARD)
    assert got["kernels"] == hf and got["available"] is True, got
    assert got["loss"] == got["loss"] and got["loss"] > 0


def test_without_hugging_face_kernels_the_root_folder_is_not_taken_for_it():
    """Where `kernels` is not installed (transformers 5.17, the GPU machine), the root's kernels/ is at most a
    namespace portion that transformers does not take for the package: is_kernels_available() is False and FastRMT
    runs. The installed package, if any, is hidden from both the import system and the metadata lookup."""
    got = _run(
        textwrap.dedent("""
        import importlib.metadata, importlib.machinery, os
        root = sys.path[0]
        class HideInstalled:  # `kernels` resolves only against the repository root, as if not installed
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name == "kernels":
                    return importlib.machinery.PathFinder.find_spec(name, [root])
                return None
        sys.meta_path.insert(0, HideInstalled)
        _version = importlib.metadata.version
        def version(name):
            if name == "kernels":
                raise importlib.metadata.PackageNotFoundError(name)
            return _version(name)
        importlib.metadata.version = version
        importlib.metadata.packages_distributions = lambda: {}
    """)
        + textwrap.dedent(_FORWARD).replace("import transformers.integrations.hub_kernels", "")
    )
    assert got["available"] is False and got["kernels"] is None, got  # a namespace portion has no __file__
    assert got["loss"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example_argvs(tmp: str) -> dict[str, list[str]]:
    model = os.path.join(ROOT, "examples", "results", "memory_attention", "model")
    return {
        "memory_attention.py": ["--out", os.path.join(tmp, "ma"), "--model", model],
        "train_memory_task.py": [
            "--task",
            "memorize",
            "--out",
            os.path.join(tmp, "tm"),
            "--curriculum",
            "1,2",
            "--eval-segments",
            "2",
            "--steps-per-stage",
            "1",
            "--final-steps",
            "1",
            "--val-every",
            "1",
            "--val-samples",
            "4",
            "--eval-samples",
            "4",
            "--batch-size",
            "2",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--segment-size",
            "16",
            "--no-progress",
        ],
        "train_lm_ddp.py": [
            "--steps",
            "1",
            "--segments",
            "2",
            "--segment-size",
            "8",
            "--num-mem-tokens",
            "2",
            "--batch-size",
            "1",
        ],
    }


def test_every_example_is_covered():
    assert sorted(_example_argvs("x")) == sorted(
        f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(_example_argvs("x")))
def test_example_scripts_run_from_the_root_beside_hugging_face_kernels(tmp_path, script):
    """Each example runs as `python examples/X.py ...` would (its folder first on sys.path, the root inserted
    by the script), and afterwards `kernels` is still Hugging Face's package and its integration imports."""
    hf = _hf_kernels_file()
    if hf is None:
        pytest.skip("Hugging Face's `kernels` is not installed")
    path = os.path.join(ROOT, "examples", script)
    argv = [path, *_example_argvs(str(tmp_path))[script]]
    env_setup = (
        f"os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', "
        f"MASTER_PORT='{_free_port()}')"
        if script == "train_lm_ddp.py"
        else "pass"
    )
    got = _run(
        f"""
        import json, os, runpy
        {env_setup}
        sys.path[0] = os.path.dirname({path!r})  # as `python examples/X.py` sets it
        sys.argv = {argv!r}
        runpy.run_path({path!r}, run_name="__main__")
        import kernels, transformers.integrations.hub_kernels
        print(json.dumps({{"kernels": kernels.__file__}}))
    """,
        timeout=420,
    )
    assert got["kernels"] == hf, got

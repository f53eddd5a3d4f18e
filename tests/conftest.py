import os
import sys

import pytest

# Triton decides at decoration time whether to interpret: set this before anything imports the kernels.
# Without CUDA, Triton kernels run in its interpreter (attn_backend='auto' still uses SDPA on the CPU).
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# One thread per pytest-xdist worker (`-n 2` on 2 cores: the tiny models are overhead-bound, and oversubscribed
# cores make them many times slower); up to two in a single process.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_REAL_SDPA = torch.nn.functional.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _sdpa_left_as_found():
    """Every test leaves ``F.scaled_dot_product_attention`` as the session found it: a stub or spy left behind
    (e.g. a monkeypatch made inside ``host_overhead.stubs()``, whose teardown restores the stub) silently breaks
    every later SDPA test in that worker; this fails the test that leaked it instead."""
    yield
    leaked = torch.nn.functional.scaled_dot_product_attention
    if leaked is not _REAL_SDPA:
        torch.nn.functional.scaled_dot_product_attention = _REAL_SDPA
        pytest.fail(f"this test left F.scaled_dot_product_attention replaced by {leaked!r}")

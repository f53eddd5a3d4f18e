"""Fixtures shared by the kernel tests.

* ``poison_buffers``: every buffer the Triton kernels overwrite (lse, delta, dq, dk, dv, the default out) starts
  as NaN, so a slot a kernel forgets to write shows; the interpreter runs with 16 x 16 blocks (small shapes still
  cross block boundaries). Used by the kernel-exactness files through ``pytestmark``.
* ``clean_dispatch_state``: the dispatch table cache, the once-only fallback log and the launch-config table are
  reset around each test, so no test sees another's table.

The kernel modules are imported inside the fixtures: tests/conftest.py must decide TRITON_INTERPRET before Triton
is imported, and collecting this folder must not import the kernels for files that never use them.
"""

import pytest
import torch


@pytest.fixture
def poison_buffers(monkeypatch):
    from rmt_fast.kernels import launch_configs as lc
    from rmt_fast.kernels import triton_attention as ta

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ta, "_empty", nan_empty)
    with lc.interpreter_mode(blocks=(16, 16)):
        yield


@pytest.fixture
def clean_dispatch_state():
    from rmt_fast import attention as seam
    from rmt_fast.kernels import dispatch, launch_configs

    dispatch.reset_cache()
    seam._FALLBACK_LOGGED.clear()
    yield
    dispatch.reset_cache()
    seam._FALLBACK_LOGGED.clear()
    launch_configs.set_launch_configs(None)

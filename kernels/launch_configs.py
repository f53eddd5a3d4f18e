"""Launch configurations of the Triton attention kernels: which (BLOCK_M, BLOCK_N, num_warps, num_stages[,
variant]) a launch of kernel kind ``"fwd"``, ``"dq"`` (backward dQ) or ``"dkdv"`` (backward dK/dV) uses.

The optional fifth field, the kernel **variant** (default ``"fa2"``), picks how the backward is scheduled
(:data:`VARIANTS`; each is a point of the tuner's config space):

* ``"fa2"``: FlashAttention-2 style: a preprocess launch computes delta = rowsum(dO * O), the dQ and dK/dV
  kernels read it;
* ``"inline"``: the kernel computes delta itself from its O and dO tiles (no preprocess launch); an inline dQ
  kernel also stores delta, so an ``"fa2"`` dK/dV launched after it reads that (one launch fewer, no extra work);
* ``"fused"`` (dK/dV only): one launch for the whole backward: each program computes dK/dV of its key block and
  dQ of one query block, delta inline; the ``dq`` configuration is then unused.

Resolved in this order at each launch (by :mod:`rmt_fast.kernels.triton_attention`):

1. ``with override_configs(fwd=..., dq=..., dkdv=...):`` the given config, used exactly (no out-of-resources
   step-down; the error propagates), not cached: for a tuner's sweep;
2. the cache of resolved configs, keyed (kind, head_dim, dtype, device index): one dict look-up;
3. on a cache miss ``launch_config(kind, head_dim, dtype)``: the tuned table installed by
   ``set_launch_configs({(kind, head_dim, dtype): (BLOCK_M, BLOCK_N, num_warps, num_stages), ...})`` (from a
   measured dispatch table, :mod:`rmt_fast.kernels.dispatch`), else the built-in heuristic table. A caller that
   replaces or extends ``launch_config`` calls ``clear_launch_cache()`` afterwards (``set_launch_configs`` does).

A 4-tuple is accepted wherever a :class:`LaunchConfig` is expected. In Triton's interpreter the heuristic uses
the interpreter's block sizes (tests set them with :func:`interpreter_mode`) and the caches are bypassed.

Above the configurations, a call at a given shape reads a :class:`ShapePlan` (launches, grids, buffer shapes,
scalar arguments of the forward and the backward), cached per shape key and cleared with the configurations
(``clear_launch_cache``).

The caches' interface (for :mod:`rmt_fast.kernels.triton_attention`; nothing outside this module touches its
underscore names, ``tests/kernels/test_launch_seam.py`` checks it):

* ``cached_config(key)``, ``cached_plan(key)``, ``cached_shape_plan(key)``: the cached configuration, launch or
  ShapePlan, or None; always None while caching is off (an :func:`override_configs` block, the interpreter). On
  the per-call path: while caching is on each name is the cache dict's own ``get`` (rebound when caching turns
  on or off), so a hit costs one attribute look-up and one C call. Read them as ``launch_configs.cached_plan``
  (never ``from launch_configs import cached_plan``: that keeps one binding);
* ``remember_config``, ``remember_plan``, ``remember_shape_plan(key, value)``: store (no-ops while caching is off;
  the shape plans are cleared when they reach ``MAX_SHAPE_PLANS``); ``forget_plans()``: drop the launches and
  shape plans (not the configurations: the out-of-resources step-down);
* ``caching()``, ``interpreting()``, ``override_active()``, ``override_config(kind)``: the state;
  ``cache_snapshot()``: copies of the three caches (tests, diagnostics); ``interpreter_mode(enabled, blocks=...)``:
  force the interpreter flag and its block sizes inside a block (tests).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton reads it once, at decoration time too


def interpreting() -> bool:
    """True when Triton runs its interpreter (``TRITON_INTERPRET=1`` when triton was imported; tests force it with
    :func:`interpreter_mode`)."""
    return _INTERPRET


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << (max(int(x), 1) - 1).bit_length()


# Kernel variants per kind (the first is the default). See the module docstring.
VARIANTS = {"fwd": ("fa2",), "dq": ("fa2", "inline"), "dkdv": ("fa2", "inline", "fused")}
DEFAULT_VARIANT = "fa2"
_ALL_VARIANTS = ("fa2", "inline", "fused")


def check_variant(kind: str, variant: str) -> None:
    """Raise ValueError unless ``variant`` is a variant of kernel ``kind`` (see :data:`VARIANTS`)."""
    if kind not in VARIANTS:
        raise ValueError(f"kind must be one of {tuple(VARIANTS)}, got {kind!r}")
    if variant not in VARIANTS[kind]:
        raise ValueError(f"the {kind!r} kernel has variants {VARIANTS[kind]}, got variant {variant!r}")


def variant_constexprs(kind: str, variant: str) -> dict:
    """The kernel's constexpr arguments that select ``variant`` (what the launcher adds to its launch)."""
    if kind == "dq":
        return {"DELTA_INLINE": variant == "inline"}
    if kind == "dkdv":
        return {"DELTA_INLINE": variant != "fa2", "FUSED_DQ": variant == "fused"}
    return {}


class LaunchConfig:
    """One kernel's launch configuration: BLOCK_M (query tile), BLOCK_N (key tile), num_warps, num_stages, and
    the kernel variant (``"fa2"``, ``"inline"``, ``"fused"``: the module docstring).

    Immutable by convention; ``kwargs`` (block sizes, warps, stages) is built once (the launch passes it as is:
    no dict per call); the variant's constexprs come from :func:`variant_constexprs`.
    """

    __slots__ = ("block_m", "block_n", "num_warps", "num_stages", "variant", "kwargs")

    def __init__(self, block_m: int, block_n: int, num_warps: int, num_stages: int, variant: str = DEFAULT_VARIANT):
        for name, value in (
            ("BLOCK_M", block_m),
            ("BLOCK_N", block_n),
            ("num_warps", num_warps),
            ("num_stages", num_stages),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LaunchConfig: {name} must be a positive int, got {value!r}")
        for name, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"LaunchConfig: {name} must be a power of two >= 16, got {value}")
        if variant not in _ALL_VARIANTS:
            raise ValueError(f"LaunchConfig: variant must be one of {_ALL_VARIANTS}, got {variant!r}")
        self.block_m, self.block_n, self.num_warps, self.num_stages = block_m, block_n, num_warps, num_stages
        self.variant = variant
        self.kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages}

    @classmethod
    def of(cls, cfg) -> LaunchConfig:
        """A LaunchConfig from a LaunchConfig or a (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant]) tuple."""
        if isinstance(cfg, LaunchConfig):
            return cfg
        if isinstance(cfg, (tuple, list)) and len(cfg) in (4, 5):
            return cls(*cfg)
        raise ValueError(f"a launch config must be (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant]), got {cfg!r}")

    def as_tuple(self) -> tuple:
        """(BLOCK_M, BLOCK_N, num_warps, num_stages), with the variant as a fifth item when it is not the
        default (so a default config equals its 4-tuple, as tables before variants wrote it)."""
        base = (self.block_m, self.block_n, self.num_warps, self.num_stages)
        return base if self.variant == DEFAULT_VARIANT else (*base, self.variant)

    def __eq__(self, other) -> bool:
        return isinstance(other, LaunchConfig) and self.as_tuple() == other.as_tuple()

    def __hash__(self) -> int:
        return hash(self.as_tuple())

    def smaller(self) -> LaunchConfig | None:
        """A cheaper configuration to retry with when a launch runs out of shared memory / registers."""
        if self.num_stages > 1:
            return LaunchConfig(self.block_m, self.block_n, self.num_warps, self.num_stages - 1, self.variant)
        if max(self.block_m, self.block_n) > 16:
            if self.block_m >= self.block_n:
                return LaunchConfig(self.block_m // 2, self.block_n, self.num_warps, 2, self.variant)
            return LaunchConfig(self.block_m, self.block_n // 2, self.num_warps, 2, self.variant)
        return None

    def __repr__(self) -> str:
        variant = "" if self.variant == DEFAULT_VARIANT else f", variant={self.variant!r}"
        return (
            f"LaunchConfig(BLOCK_M={self.block_m}, BLOCK_N={self.block_n}, "
            f"num_warps={self.num_warps}, num_stages={self.num_stages}{variant})"
        )


KINDS = ("fwd", "dq", "dkdv")

# Interpreter (CPU test) block sizes (BLOCK_M, BLOCK_N): powers of two >= 16; tests change them.
_INTERPRET_BLOCKS = (16, 16)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim (<= 64, <= 128, <= 256).
# 2-byte dtypes: FlashAttention-2 Triton recipes for Ampere/Hopper; head dims 64 and 128 picked from the static
# report (kernels/tuned/static/sm90.md, Triton 3.9, sm_90, fp16, causal + padded by counts and by runs): no
# register spills, every dot on wgmma. The earlier 4-warp fwd / dQ tiles (128x64 w4, 128x32 w4; 128x64 w8 and
# 64x64 w8 at head dim 128) spilled 200-630 B there. Not timed on hardware. fp32 runs its dots on FMA units
# (exact IEEE) or TF32, so it gets small tiles and 8 warps.
_CONFIGS = {
    ("fwd", False): ((128, 64, 8, 3), (64, 32, 8, 3), (64, 32, 8, 2)),
    ("dq", False): ((128, 32, 8, 3), (64, 32, 8, 3), (32, 32, 8, 2)),
    ("dkdv", False): ((32, 128, 8, 3), (64, 64, 8, 2), (32, 32, 8, 2)),
    ("fwd", True): ((64, 32, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2)),
    ("dq", True): ((64, 16, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)),
    ("dkdv", True): ((16, 64, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)),
}


# The built-in table's kernel variants (kinds not named: DEFAULT_VARIANT). dQ "inline": the dQ kernel computes
# delta from the O and dO tiles it is given and stores it for the dK/dV kernel, in place of the preprocess launch:
# the same reads of dO, one read of O, one launch fewer per backward (a host-time cost on every step: a launch
# is the largest piece of the backward's host time, host-overhead). Static report (kernels/tuned/static/sm90.md,
# sm_90, fp16, causal + padded by counts and by runs): at this table's dQ tiles the inline kernel has no spill
# and the same wgmma count as "fa2" (head dim 64: 247 registers vs 195-210; 128: 246-255 vs 244); neither
# variant's backward is timed on a GPU yet (issue 24). A measured table picks the variant per case.
_DEFAULT_VARIANTS = {"dq": "inline"}


def heuristic_config(kind: str, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Per-kernel launch configuration from the head dim and dtype: a table look-up, no autotuning, no sync.

    kind: "fwd", "dq" or "dkdv"; BLOCK_M always tiles queries and BLOCK_N keys.
    """
    variant = _DEFAULT_VARIANTS.get(kind, DEFAULT_VARIANT)
    if interpreting():
        return LaunchConfig(*_INTERPRET_BLOCKS, 4, 1, variant)
    d = next_pow2(head_dim)
    table = _CONFIGS[(kind, dtype == torch.float32)]
    return LaunchConfig(*table[0 if d <= 64 else 1 if d <= 128 else 2], variant)


# Configurations supplied by set_launch_configs: (kind, head_dim, dtype) -> LaunchConfig.
_TABLE: dict[tuple, LaunchConfig] = {}
# Active override_configs block: kind -> LaunchConfig (None outside any block).
_OVERRIDE: dict[str, LaunchConfig] | None = None
# (kind, head_dim, dtype, device index) -> the configuration resolved (and, after an out-of-resources retry,
# stepped down) for it: one dict look-up per launch after the first.
_CONFIG_CACHE: dict[tuple, LaunchConfig] = {}
# Kernel variant key -> the ready launch built from a resolved configuration (filled by triton_attention);
# cleared with the configurations it was built from.
_PLANS: dict[tuple, object] = {}
# Shape key -> the ShapePlan of a call at that shape (filled by triton_attention); cleared with the above, and
# when it reaches MAX_SHAPE_PLANS entries (a plan is rebuilt in microseconds; the bound keeps memory flat).
_SHAPE_PLANS: dict[tuple, ShapePlan] = {}
MAX_SHAPE_PLANS = 4096


class ShapePlan:
    """Everything a call of the attention kernels needs that depends on the shapes, dtype, device and segment
    layout but not on the tensors' strides or data: the launch of each kernel (kernel, configuration), its grid,
    the shapes of the buffers the kernels fill and the scalar arguments (heads, lengths, slot counts, scales).

    Built on the first call at a shape key (the forward at once, the backward's launches at the first backward:
    ``bwd`` is None until then) and cached in ``_SHAPE_PLANS``: a call after that builds its shape key, does one
    dict look-up and then only reads strides and allocates its outputs. The builder (``triton_attention``) owns
    the field values; this class only holds them.

    * ``fwd``, ``fwd_grid``: the forward's launch and grid; ``fwd_tail``: its scalar arguments after the
      strides, up to (not including) ``dropout_p, seed``;
    * ``out_shape`` (B, Tq, Hq, D), ``lse_shape`` and ``delta_shape`` (B, Hq, Tq), ``dq_shape`` (B, Tq, Hq, D)
      and ``dkv_shape`` (B, Tk, Hkv, D): the buffers' shapes (gradients are allocated (B, T, H, D) and seen
      transposed); ``dtype``, ``device``: theirs;
    * ``bwd``: None, or (launch, grid, scalar tail) of the preprocess, dQ and dK/dV kernels;
    * ``key``: the kernel variant key without its kind (for the launches' out-of-resources step-down);
      ``dims``: (B, Hq, Hkv, Tq, Tk); ``scale``: the softmax scale; ``cached``: whether it is in the cache;
    * ``fast``: kernel kind -> its fast launch (:func:`~rmt_fast.kernels.fast_launch.build`; None where it does not
      apply), built by the launcher after the first launch of a cached plan; ``groups``: ``"fwd"`` or (need dQ,
      need dK/dV) -> (call signature, environment check, kind -> unchecked launch), made by the launcher at a
      call whose launches were all fast (``triton_attention``'s module docstring);
    * ``new_out``, ``new_lse``: argument-free callables that allocate the forward's output and lse buffers;
      ``fwd_rest``: the forward's arguments after q, k and v's strides for an output from ``new_out`` (its strides,
      then ``fwd_tail``); ``hook``: the allocation hook the plan was built with (None: the plan allocates by
      itself, as ``new_out`` does).
    """

    __slots__ = (
        "key",
        "dims",
        "dtype",
        "device",
        "fwd",
        "fwd_grid",
        "fwd_tail",
        "scale",
        "out_shape",
        "lse_shape",
        "delta_shape",
        "dq_shape",
        "dkv_shape",
        "bwd",
        "cached",
        "fast",
        "groups",
        "new_out",
        "new_lse",
        "fwd_rest",
        "hook",
    )

    def __init__(self, key, dims, dtype, device, fwd, fwd_grid, fwd_tail, scale, shapes, cached: bool):
        self.key, self.dims, self.dtype, self.device, self.cached = key, dims, dtype, device, cached
        self.fwd, self.fwd_grid, self.fwd_tail, self.scale = fwd, fwd_grid, fwd_tail, scale
        self.out_shape, self.lse_shape, self.delta_shape, self.dq_shape, self.dkv_shape = shapes
        self.bwd = None
        self.fast, self.groups = {}, {}
        self.new_out = self.new_lse = self.fwd_rest = self.hook = None


def launch_config(kind: str, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration a launch of kernel ``kind`` ("fwd", "dq", "dkdv") uses for this head dim and dtype:
    the :func:`set_launch_configs` table entry if there is one, else the built-in heuristic table.

    This is the look-up hook: it runs once per (kind, head_dim, dtype, device) and its answer is cached; a
    caller that replaces or extends it must call :func:`clear_launch_cache` afterwards.
    """
    cfg = _TABLE.get((kind, head_dim, dtype))
    return cfg if cfg is not None else heuristic_config(kind, head_dim, dtype)


def set_launch_configs(table: dict | None) -> None:
    """Replace the measured configuration table: ``{(kind, head_dim, dtype): (BLOCK_M, BLOCK_N, num_warps,
    num_stages) or LaunchConfig}``; entries not in it use the heuristic. ``None`` or ``{}`` clears it.
    Validates every entry before changing anything."""
    new = {}
    for key, cfg in (table or {}).items():
        if not (
            isinstance(key, tuple)
            and len(key) == 3
            and key[0] in KINDS
            and isinstance(key[1], int)
            and isinstance(key[2], torch.dtype)
        ):
            raise ValueError(f"set_launch_configs: keys must be (kind in {KINDS}, head_dim: int, dtype), got {key!r}")
        new[key] = LaunchConfig.of(cfg)
        check_variant(key[0], new[key].variant)
    _TABLE.clear()
    _TABLE.update(new)
    clear_launch_cache()


def clear_launch_cache() -> None:
    """Forget the resolved configurations (the next launch of each kind asks :func:`launch_config` again)."""
    _CONFIG_CACHE.clear()
    forget_plans()


def forget_plans() -> None:
    """Forget the cached launches and shape plans, keeping the resolved configurations (a launch that stepped its
    configuration down: the plans built from the old one go, :func:`remember_config` records the new one)."""
    _PLANS.clear()
    _SHAPE_PLANS.clear()


# ------------------------------------------------------------------------------------ the caches' interface
def caching() -> bool:
    """True when launches read and fill the caches: outside :func:`override_configs` blocks and the interpreter."""
    return _OVERRIDE is None and not _INTERPRET


def override_active() -> bool:
    """True inside an :func:`override_configs` block."""
    return _OVERRIDE is not None


def override_config(kind: str) -> LaunchConfig | None:
    """The configuration an active :func:`override_configs` block fixes for kernel ``kind``, else None."""
    return None if _OVERRIDE is None else _OVERRIDE.get(kind)


def _no_entry(key) -> None:
    return None


# Per-call look-ups (see the module docstring): each is the cache's ``dict.get`` while caching is on, else
# ``_no_entry``; ``_rebind`` switches them whenever ``_OVERRIDE`` or ``_INTERPRET`` changes.
cached_config = _CONFIG_CACHE.get
cached_plan = _PLANS.get
cached_shape_plan = _SHAPE_PLANS.get


def _rebind() -> None:
    global cached_config, cached_plan, cached_shape_plan
    on = caching()
    cached_config = _CONFIG_CACHE.get if on else _no_entry
    cached_plan = _PLANS.get if on else _no_entry
    cached_shape_plan = _SHAPE_PLANS.get if on else _no_entry


def remember_config(key: tuple, cfg: LaunchConfig) -> None:
    """Cache the configuration resolved for ``key`` = (kind, head_dim, dtype, device) (no-op while not caching)."""
    if caching():
        _CONFIG_CACHE[key] = cfg


def remember_plan(key: tuple, plan) -> None:
    """Cache the launch of kernel variant ``key`` (no-op while not caching)."""
    if caching():
        _PLANS[key] = plan


def remember_shape_plan(key: tuple, plan: ShapePlan) -> None:
    """Cache the ShapePlan of shape key ``key`` (no-op while not caching); the cache is emptied first when it holds
    ``MAX_SHAPE_PLANS`` plans (e.g. a decode loop: a new query / key length at every step)."""
    if caching():
        if len(_SHAPE_PLANS) >= MAX_SHAPE_PLANS:
            _SHAPE_PLANS.clear()
        _SHAPE_PLANS[key] = plan


class CacheSnapshot(NamedTuple):
    """Copies of the caches: ``configs`` (kind, head_dim, dtype, device) -> LaunchConfig, ``plans`` kernel variant
    key -> launch, ``shape_plans`` shape key -> ShapePlan."""

    configs: dict
    plans: dict
    shape_plans: dict


def cache_snapshot() -> CacheSnapshot:
    """Copies of the three caches (for tests and diagnostics; the entries themselves are not copied)."""
    return CacheSnapshot(dict(_CONFIG_CACHE), dict(_PLANS), dict(_SHAPE_PLANS))


@contextlib.contextmanager
def interpreter_mode(enabled: bool | None = None, blocks: tuple[int, int] | None = None) -> Iterator[None]:
    """Inside the block, launches run as if Triton's interpreter were on (``enabled=True``: heuristic blocks,
    caches bypassed) or off (``False``: the compiled path's caching, e.g. with stub kernels on the CPU); ``None``
    keeps it. ``blocks``: the interpreter's (BLOCK_M, BLOCK_N), powers of two >= 16. For tests: the state is
    process-global; it is restored on exit."""
    global _INTERPRET, _INTERPRET_BLOCKS
    if blocks is not None:
        LaunchConfig(*blocks, 4, 1)  # validates them
    saved = (_INTERPRET, _INTERPRET_BLOCKS)
    try:
        if enabled is not None:
            _INTERPRET = bool(enabled)
        if blocks is not None:
            _INTERPRET_BLOCKS = tuple(blocks)
        _rebind()
        yield
    finally:
        _INTERPRET, _INTERPRET_BLOCKS = saved
        _rebind()


@contextlib.contextmanager
def override_configs(fwd=None, dq=None, dkdv=None) -> Iterator[None]:
    """Inside the block, every launch of a given kernel uses the given configuration (a LaunchConfig or a
    (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant]) tuple) instead of :func:`launch_config` (None: unchanged).

    For a tuner's sweep: the configuration is used exactly, without the out-of-resources step-down (the
    ``triton.runtime.errors.OutOfResources`` error propagates) and without touching the cache. Blocks nest;
    the state is process-global (not per thread).
    """
    global _OVERRIDE
    given = {k: LaunchConfig.of(c) for k, c in (("fwd", fwd), ("dq", dq), ("dkdv", dkdv)) if c is not None}
    for kind, cfg in given.items():
        check_variant(kind, cfg.variant)
    previous = _OVERRIDE
    _OVERRIDE = {**(previous or {}), **given}
    _rebind()
    try:
        yield
    finally:
        _OVERRIDE = previous
        _rebind()


_rebind()

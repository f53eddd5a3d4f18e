"""The measured dispatch table: which attention backend ``attn_backend="auto"`` runs, per case.

A table is one JSON file per GPU architecture, ``kernels/tuned/<arch>.json`` (``arch`` is ``sm<major><minor>``
from ``torch.cuda.get_device_capability``, e.g. ``sm90`` for H100 and H200), written by
``rmt-fast-bench tune`` on that hardware. Only measured tables are committed (``kernels/tuned/README.md``).

A case is keyed by

* ``dtype`` (``"float16"``, ``"bfloat16"``, ...) and the exact ``head_dim``;
* the shape class: the key length bucket (``T_EDGES``), the (batch x query heads) bucket (``BH_EDGES``: the
  number of (row, head) pairs sets the kernel's parallelism, whatever the model's head count), ``causal``,
  ``padded`` (the layout hides some token slots) and ``decode`` (fewer queries than keys);
* ``needs_grad`` (a backward pass follows, so forward + backward was compared) and ``mode``: ``"graphed"``
  (inside a CUDA-graph capture: device time alone) or ``"eager"`` (host time included).

The answer names one backend (:data:`BACKENDS`): ``"triton"`` (with the launch configurations the tuner picked
for that dtype and head dim), ``"sdpa"`` (SDPA choosing its own kernel, what runs without a table), one SDPA
kernel forced (``"sdpa_flash"``, ``"sdpa_efficient"``, ``"sdpa_cudnn"``) or ``"flex"`` (FlexAttention with the
layout's ``mask_mod``). No table, a table for another architecture, or no entry for the case: ``"sdpa"``. The
tuner races them all and names another backend than ``"sdpa"`` only where it measured faster than ``"sdpa"`` by
the table's ``margin`` (:func:`choose`).

Formats: ``rmt-fast-dispatch/2`` (this one: any backend of :data:`BACKENDS`, the raced times in ``ms``) and the
previous ``rmt-fast-dispatch/1`` (``"triton"`` or ``"sdpa"``, times in ``triton_ms``/``sdpa_ms``), which still
loads: its ``"sdpa"`` means SDPA choosing its own kernel, as before.

This module imports torch only (no transformers, no runtime, and triton only lazily, to install the launch
configurations in the kernel module).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .launch_configs import KINDS, VARIANTS, set_launch_configs

logger = logging.getLogger(__name__)

FORMAT = "rmt-fast-dispatch/2"
FORMAT_V1 = "rmt-fast-dispatch/1"  # the previous format: still loads (backend "triton" or "sdpa")
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
ENV_TABLE = "RMT_FAST_DISPATCH_TABLE"  # a path: use this table file instead of kernels/tuned/<arch>.json
MODES = ("eager", "graphed")
# Every backend a table entry may name. "sdpa" is SDPA choosing its own kernel; "sdpa_<kernel>" runs SDPA with that
# kernel alone (torch.nn.attention.sdpa_kernel); "flex" is FlexAttention with the layout's mask_mod.
DEFAULT_BACKEND = "sdpa"
SDPA_KERNELS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
BACKENDS = ("triton", DEFAULT_BACKEND, *SDPA_KERNELS, "flex")
BACKENDS_V1 = ("triton", DEFAULT_BACKEND)
# Bucket upper edges (inclusive). The tuner measures T = 532, 1044, 2068 (segments of 512, 1024, 2048 tokens
# plus 2 x 10 memory slots) and B x H = 12, 48, 96, 384 (B = 1, 4, 8, 32 at 12 heads): each bucket holds one
# measured point, the edges lie between them (geometric means, rounded).
T_EDGES = (768, 1536, 3072)
BH_EDGES = (24, 72, 192)
DEFAULT_MARGIN = 0.03


def _bucket(value: int, edges: tuple[int, ...], name: str) -> str:
    for edge in edges:
        if value <= edge:
            return f"{name}<={edge}"
    return f"{name}>{edges[-1]}"


def t_bucket(seq_len: int) -> str:
    """The key-length bucket: ``"T<=768"``, ``"T<=1536"``, ``"T<=3072"`` or ``"T>3072"``."""
    return _bucket(int(seq_len), T_EDGES, "T")


def bh_bucket(batch_heads: int) -> str:
    """The (batch x query heads) bucket: ``"BH<=24"``, ``"BH<=72"``, ``"BH<=192"`` or ``"BH>192"``."""
    return _bucket(int(batch_heads), BH_EDGES, "BH")


T_BUCKETS = tuple(t_bucket(e) for e in T_EDGES) + (t_bucket(T_EDGES[-1] + 1),)
BH_BUCKETS = tuple(bh_bucket(e) for e in BH_EDGES) + (bh_bucket(BH_EDGES[-1] + 1),)


@dataclass(frozen=True)
class ShapeClass:
    t: str
    bh: str
    causal: bool
    padded: bool
    decode: bool = False

    @classmethod
    def of(cls, tq: int, tk: int, batch_heads: int, causal: bool, padded: bool) -> ShapeClass:
        return cls(t_bucket(tk), bh_bucket(batch_heads), bool(causal), bool(padded), int(tq) != int(tk))

    def describe(self) -> str:
        return " ".join(
            [self.t, self.bh, "causal" if self.causal else "bidirectional", "padded" if self.padded else "full"]
            + (["decode"] if self.decode else [])
        )


class Decision(NamedTuple):
    backend: str  # one of BACKENDS
    configs: dict | None  # kind -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for "triton", else None
    reason: str  # why: the measurement, or why there is none


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def _key(dtype, head_dim: int, cls: ShapeClass, needs_grad: bool, mode: str) -> tuple:
    return (dtype_name(dtype), int(head_dim), cls.t, cls.bh, cls.causal, cls.padded, cls.decode, bool(needs_grad), mode)


def _need(d: dict, field: str, kind, where: str):
    if field not in d:
        raise ValueError(f"dispatch table: {where} lacks the field {field!r}")
    value = d[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"dispatch table: {where}.{field} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _config_tuple(value, where: str, kind: str) -> tuple:
    """A table's launch config: [BLOCK_M, BLOCK_N, num_warps, num_stages] or, with a kernel variant of ``kind``
    (``launch_configs.VARIANTS``), [..., "variant"]."""
    ok = (
        isinstance(value, (list, tuple))
        and len(value) in (4, 5)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value[:4])
    )
    if ok and len(value) == 5:
        ok = value[4] in VARIANTS[kind]
    if not ok or any(b < 16 or b & (b - 1) for b in value[:2]):
        raise ValueError(
            f"dispatch table: {where} must be [BLOCK_M, BLOCK_N, num_warps, num_stages] (positive ints, blocks "
            f"powers of two >= 16) or that and a variant of the {kind!r} kernel {VARIANTS[kind]}, got {value!r}"
        )
    return tuple(value)


class DispatchTable:
    """A parsed, validated dispatch table (see the module docstring and ``kernels/tuned/README.md``)."""

    def __init__(self, data: dict, source: str = "<dict>"):
        if not isinstance(data, dict):
            raise ValueError(f"dispatch table {source}: expected a JSON object, got {type(data).__name__}")
        where = f"dispatch table {source}"
        if data.get("format") not in (FORMAT, FORMAT_V1):
            raise ValueError(
                f"{where}: format must be {FORMAT!r} (or the previous {FORMAT_V1!r}), got {data.get('format')!r}"
            )
        self.format = data["format"]
        backends = BACKENDS if self.format == FORMAT else BACKENDS_V1
        self.source = source
        self.arch = _need(data, "arch", str, "table")
        self.measured = _need(data, "measured", bool, "table")
        self.devices = list(data.get("devices", []))
        self.provenance = dict(data.get("provenance", {}))
        margin = data.get("margin", DEFAULT_MARGIN)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < 1:
            raise ValueError(f"{where}: margin must be a number in [0, 1), got {margin!r}")
        self.margin = float(margin)
        self.configs: dict[tuple[str, int], dict[str, tuple]] = {}
        for i, c in enumerate(_need(data, "configs", list, "table")):
            w = f"configs[{i}]"
            if not isinstance(c, dict):
                raise ValueError(f"{where}: {w} must be an object")
            key = (_need(c, "dtype", str, w), _need(c, "head_dim", int, w))
            self.configs[key] = {k: _config_tuple(c[k], f"{w}.{k}", k) for k in KINDS if k in c}
        self.entries: dict[tuple, dict] = {}
        for i, e in enumerate(_need(data, "entries", list, "table")):
            w = f"entries[{i}]"
            if not isinstance(e, dict):
                raise ValueError(f"{where}: {w} must be an object")
            t, bh = _need(e, "t_bucket", str, w), _need(e, "bh_bucket", str, w)
            if t not in T_BUCKETS:
                raise ValueError(f"{where}: {w}.t_bucket must be one of {T_BUCKETS}, got {t!r}")
            if bh not in BH_BUCKETS:
                raise ValueError(f"{where}: {w}.bh_bucket must be one of {BH_BUCKETS}, got {bh!r}")
            mode = _need(e, "mode", str, w)
            if mode not in MODES:
                raise ValueError(f"{where}: {w}.mode must be one of {MODES}, got {mode!r}")
            backend = _need(e, "backend", str, w)
            if backend not in backends:
                raise ValueError(f"{where}: {w}.backend must be one of {backends} in {self.format}, got {backend!r}")
            if "ms" in e:
                _check_times(e["ms"], f"{where}: {w}.ms")
            cls = ShapeClass(
                t, bh, _need(e, "causal", bool, w), _need(e, "padded", bool, w), bool(e.get("decode", False))
            )
            key = _key(
                _need(e, "dtype", str, w), _need(e, "head_dim", int, w), cls, _need(e, "needs_grad", bool, w), mode
            )
            if key in self.entries:
                raise ValueError(f"{where}: {w} repeats the case {key}")
            self.entries[key] = dict(e)
        self.data = data

    # ---------------------------------------------------------------------------------------------- lookup
    def lookup(self, dtype, head_dim: int, cls: ShapeClass, needs_grad: bool, graphed: bool) -> Decision:
        mode = "graphed" if graphed else "eager"
        case = f"{dtype_name(dtype)} D={head_dim} {cls.describe()} {'training' if needs_grad else 'inference'} {mode}"
        entry = self.entries.get(_key(dtype, head_dim, cls, needs_grad, mode))
        if entry is None:
            return Decision("sdpa", None, f"no measured entry for {case} in {self.source}")
        measured, backend = _measured_text(entry), entry["backend"]
        if backend != "triton":
            return Decision(backend, None, f"{backend} measured fastest for {case}{measured} ({self.source})")
        configs = self.configs.get((dtype_name(dtype), int(head_dim)))
        return Decision("triton", configs, f"triton measured fastest for {case}{measured} ({self.source})")

    def launch_configs(self) -> dict[tuple[str, int, torch.dtype], tuple]:
        """``{(kind, head_dim, torch dtype): (BLOCK_M, BLOCK_N, num_warps, num_stages[, variant])}`` for the kernel
        module's ``set_launch_configs``."""
        out = {}
        for (dt, d), kinds in self.configs.items():
            torch_dtype = getattr(torch, dt, None)
            if not isinstance(torch_dtype, torch.dtype):
                continue
            for kind, cfg in kinds.items():
                out[(kind, d, torch_dtype)] = cfg
        return out


def _check_times(times, where: str) -> None:
    if not isinstance(times, dict):
        raise ValueError(f"{where} must be an object {{backend: ms or null}}, got {times!r}")
    for name, value in times.items():
        if name not in BACKENDS:
            raise ValueError(f"{where} names the backend {name!r}; expected one of {BACKENDS}")
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ValueError(f"{where}.{name} must be a number of milliseconds or null, got {value!r}")


def _measured_text(entry: dict) -> str:
    times = entry.get("ms")
    if isinstance(times, dict):
        got = sorted((v, k) for k, v in times.items() if isinstance(v, (int, float)))
        return (": " + ", ".join(f"{k} {v:.4g} ms" for v, k in got)) if got else ""
    t, s = entry.get("triton_ms"), entry.get("sdpa_ms")
    if isinstance(t, (int, float)) and isinstance(s, (int, float)):
        return f": Triton {t:.4g} ms, SDPA {s:.4g} ms"
    return ""


# ------------------------------------------------------------------------------------------------ loading
def load_table(path: str | os.PathLike) -> DispatchTable:
    """Read and validate a table file (ValueError naming the problem)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"dispatch table {path}: not valid JSON ({exc})") from exc
    return DispatchTable(data, source=str(path))


def arch_of(device: torch.device | str | int | None = None) -> str:
    """``"sm<major><minor>"`` of a CUDA device (e.g. ``"sm90"``)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def table_path(arch: str) -> Path:
    return TUNED_DIR / f"{arch}.json"


_UNSET = object()
_OVERRIDE: Any = _UNSET  # a table (or None) that replaces the per-architecture look-up (tests, the tuner)
_CACHE: dict[Any, DispatchTable | None] = {}
_INSTALLED: set[int] = set()  # id() of the tables whose launch configurations went to the kernel module
_NO_TABLE_REASON: dict[int, str] = {}  # device index -> the fall-back reason, built once (not while tracing)


def _read_for_arch(arch: str) -> DispatchTable | None:
    env = os.environ.get(ENV_TABLE)
    path = Path(env) if env else table_path(arch)
    if not path.is_file():
        if env:
            warnings.warn(
                f"rmt_fast: {ENV_TABLE}={env} is not a file; attn_backend='auto' uses SDPA",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    try:
        table = load_table(path)
    except (OSError, ValueError) as exc:
        warnings.warn(
            f"rmt_fast: ignoring the dispatch table ({exc}); attn_backend='auto' uses SDPA",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if table.arch != arch:
        warnings.warn(
            f"rmt_fast: the dispatch table {path} is for {table.arch}, this GPU is {arch}; ignoring it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if not table.measured:
        warnings.warn(
            f"rmt_fast: the dispatch table {path} is an unmeasured example; ignoring it", RuntimeWarning, stacklevel=3
        )
        return None
    return table


def table_for_device(device: torch.device) -> DispatchTable | None:
    """The table for this device (cached per device), or None; its launch configurations are installed in the
    kernel module the first time it is returned."""
    if _OVERRIDE is not _UNSET:
        table = _OVERRIDE
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _CACHE:
            arch = arch_of(index)
            _CACHE[index] = _read_for_arch(arch)
            _NO_TABLE_REASON[index] = f"no measured dispatch table ({table_path(arch)})"
        table = _CACHE[index]
    if table is not None and id(table) not in _INSTALLED:
        _install(table)
    return table


def _install(table: DispatchTable) -> None:
    _INSTALLED.add(id(table))
    configs = table.launch_configs()
    if not configs:
        return
    set_launch_configs(configs)  # without triton they are never used ('auto' never picks Triton)


def reset_cache() -> None:
    """Forget the loaded tables (they are read again at the next decision)."""
    _CACHE.clear()
    _INSTALLED.clear()
    _NO_TABLE_REASON.clear()


def preload() -> None:
    """Read the current CUDA device's table now (file I/O and warnings), outside any compiled region: FastRMT's
    constructor calls this, so a compiled segment step only does dictionary look-ups."""
    if torch.cuda.is_available():
        table_for_device(torch.device("cuda", torch.cuda.current_device()))


@contextlib.contextmanager
def use_table(table: DispatchTable | dict | None) -> Iterator[DispatchTable | None]:
    """Inside the block every device uses ``table`` (a DispatchTable, a dict in the file format, or None for
    "no table"), whatever its architecture: for tests and for checking a freshly tuned table."""
    global _OVERRIDE
    if isinstance(table, dict):
        table = DispatchTable(table)
    previous = _OVERRIDE
    _OVERRIDE = table
    try:
        yield table
    finally:
        _OVERRIDE = previous


# ----------------------------------------------------------------------------------------------- decision
def decide(q: torch.Tensor, k: torch.Tensor, layout, *, needs_grad: bool, graphed: bool) -> Decision:
    """The backend the table picks for q (B, Hq, Tq, D), k (B, Hkv, Tk, D) on a CUDA device, and a segment
    ``layout`` (read for ``causal`` and ``is_padded``). Whether the named backend can run the case (head dim,
    dropout, grouped-query heads, ...) is the caller's check (``rmt_fast.attention.choose_backend``)."""
    B, Hq, Tq, D = q.shape
    cls = ShapeClass.of(Tq, k.shape[-2], B * Hq, layout.causal, layout.is_padded)
    table = table_for_device(q.device)
    if table is None:
        if _OVERRIDE is not _UNSET:
            return Decision("sdpa", None, "no measured dispatch table (the dispatch table override)")
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        return Decision("sdpa", None, _NO_TABLE_REASON[index])
    return table.lookup(q.dtype, D, cls, needs_grad, graphed)


def choose(times: dict[str, float | None], margin: float = DEFAULT_MARGIN) -> str:
    """The tuner's rule over ``{backend: ms or None}``: the fastest backend, but one other than ``"sdpa"`` (what
    runs without a table) only when it measured faster than ``"sdpa"`` by ``margin`` (a fraction); ``"sdpa"``
    when SDPA has no number."""

    def ok(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    for name in times:
        if name not in BACKENDS:
            raise ValueError(f"choose: unknown backend {name!r}; expected one of {BACKENDS}")
    base = times.get(DEFAULT_BACKEND)
    if not ok(base):
        return DEFAULT_BACKEND
    best = min((v, BACKENDS.index(k), k) for k, v in times.items() if ok(v))
    return best[2] if best[2] != DEFAULT_BACKEND and best[0] <= base * (1.0 - margin) else DEFAULT_BACKEND


__all__ = [
    "FORMAT",
    "FORMAT_V1",
    "BACKENDS",
    "BACKENDS_V1",
    "DEFAULT_BACKEND",
    "SDPA_KERNELS",
    "T_EDGES",
    "BH_EDGES",
    "T_BUCKETS",
    "BH_BUCKETS",
    "MODES",
    "KINDS",
    "ShapeClass",
    "Decision",
    "DispatchTable",
    "load_table",
    "arch_of",
    "table_path",
    "table_for_device",
    "use_table",
    "reset_cache",
    "decide",
    "choose",
    "preload",
    "t_bucket",
    "bh_bucket",
    "dtype_name",
]

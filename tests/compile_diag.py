"""Diagnosis of a compiled-step mismatch: eager and compiled FastRMT, each against a float64 run of the same weights.

For one of the tests' models at the CUDA compile test's shape (m = 3, segments of 64, 2 x 160 tokens: three
segments, one short), the step runs

* eagerly in float64 (the reference) and in the dtype under test,
* compiled (``torch.compile`` of the step, :class:`rmt_fast.compiled.CompiledStep`) under each name of ``backends``:
  ``"dynamo"`` (``backend="eager"``: Dynamo's graph run as is), ``"aot_eager"`` (plus AOT autograd,
  functionalisation and decompositions) and ``"inductor"`` (plus inductor's code),
* optionally with one SDPA kernel forced inside the step (as the dispatch table's ``"sdpa_<kernel>"`` entries
  force it), eager and inductor alike (``"eager+sdpa_math"``, ``"inductor+sdpa_math"``, ...),

and every low-precision run's relative error ``||x - ref|| / ||ref||`` against float64 is recorded per segment
(memory and logits), for the outputs (memory, logits, loss) and the largest over the parameter gradients (those
whose float64 norm is over 1e-3); the memory parameter's gradient is recorded whatever its norm
(``memory_grad``), and each compiled run is also compared with eager directly (``compiled_vs_eager``: final
memory, the memory gradient, the worst gradient), as is each eager run with a kernel forced (``eager_vs_eager``:
how far two eager runs in the same dtype fall apart). The :func:`verdict` classifies the numbers:

* ``"ok"``: every compiled run within ``bound = max(factor * eager_err, TOL[dtype])`` of float64, quantity by
  quantity and segment by segment, and compiled within ``TOL[dtype]`` of eager;
* ``"<dtype>-effect"`` (``"fp16-effect"``, ...): every compiled run within the bound, but compiled and eager
  differ by more than ``TOL[dtype]`` (final memory, memory gradient or worst gradient): the mismatch is the low
  precision's (both are that far from float64);
* ``"eager-nonfinite"``: the eager run itself has NaN / infinity against float64 (overflow of the dtype);
* ``"compile-bug:<run>"``: a compiled run beyond the bound (NaN included), ``<run>`` the first that fails in
  the order ``dynamo`` (tracing) -> ``aot_eager`` (AOT autograd) -> ``inductor`` (inductor's code), then the
  forced-kernel runs (``"compile-bug:inductor+sdpa_efficient"``: only that kernel under inductor);
  ``"compile-error:<run>"`` where, in that order, a compiled run raised instead (a forced kernel that cannot
  take the case is only listed in the explanation).

Caveat: a decoder's float64 loss goes through ``logits.float()`` (FastRMT computes its cross-entropy in float32),
so that loss is compared at float32 precision.

Used by tests/runtime/test_compiled_step.py (the CUDA test calls it on a failure, or with ``RMT_FAST_COMPILE_DIAG=1``,
and writes the JSON into ``RMT_FAST_DIAG_DIR``, which benchmarks/device_check.sh sets to its results folder).
From the command line::

    python tests/compile_diag.py --device cuda --dtype float16 --model bert_cls --out x.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the tests folder and the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import CLS, SEP, VOCAB, bert_cls, gpt2, llama, run  # noqa: E402
from numerics import TOL, rel_err  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BACKENDS = ("dynamo", "aot_eager", "inductor")  # run names; "dynamo" is torch.compile(backend="eager")
COMPILE_BACKEND = {"dynamo": "eager", "aot_eager": "aot_eager", "inductor": "inductor"}
SDPA_KERNELS = ("sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
ENCODER_KW = dict(cls_token_id=CLS, sep_token_id=SEP)
MODELS = {"llama": (llama, {}), "gpt2": (gpt2, {}), "bert_cls": (bert_cls, ENCODER_KW)}
FACTOR = 4.0  # a compiled run may be this many times as far from float64 as eager is
GRAD_FLOOR = 1e-3  # gradients whose float64 norm is below this are rounding noise: not compared


def model_factory(name: str):
    """(factory, FastRMT keyword arguments) for ``name``: ``llama``, ``gpt2``, ``bert_cls``, or one of them with a
    head dim, ``llama@hd16`` (hidden size = 4 heads x 16: the Triton kernel takes head dims 16..256)."""
    base, _, hd = name.partition("@hd")
    if base not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)} (optionally @hdN), got {name!r}")
    factory, kw = MODELS[base]
    if hd:
        return functools.partial(factory, hidden_size=4 * int(hd)), dict(kw)
    return factory, dict(kw)


def build(model: str, device, *, attn_backend: str = "auto", m: int = 3, size: int = 64, tokens: int = 160):
    """The float32 FastRMT (seeded weights and memory) and its inputs, as the CUDA compile test builds them."""
    from rmt_fast import FastRMT

    factory, kw = model_factory(model)
    torch.manual_seed(0)
    base = FastRMT(factory(), m, size, attn_backend=attn_backend, **kw).to(device)
    ids = torch.randint(3, VOCAB, (2, tokens), generator=torch.Generator().manual_seed(3)).to(device)
    labels = ids if base.is_decoder else torch.tensor([1, 0], device=device)
    return base, dict(input_ids=ids, labels=labels)


class _Recorder:
    """Stands in for the step: records every segment's memory and logits (copies: a step that hands back a view of
    a buffer that the next segment overwrites would otherwise hide here; the final outputs show it)."""

    def __init__(self, step):
        self.step, self.memory, self.logits = step, [], []

    def __call__(self, *args, **kwargs):
        out = self.step(*args, **kwargs)
        first, memory = out[0], out[1]
        logits = first if first is None or isinstance(first, torch.Tensor) else first.logits
        self.memory.append(memory.detach().clone())
        self.logits.append(None if logits is None else logits.detach().clone())
        return out


@contextlib.contextmanager
def _forced(kernel: str | None):
    """Every attention call of the step runs SDPA with ``kernel`` alone, as the dispatch table's ``"sdpa_<kernel>"``
    entries do: the seam's backend choice returns it, so :func:`~rmt_fast.kernels.sdpa_attention.sdpa_rmt_attention`
    enters ``torch.nn.attention.sdpa_kernel`` inside the step, where torch.compile traces it (the context entered
    around a compiled call was measured to change nothing under inductor on the CPU)."""
    if kernel is None:
        yield
        return
    import rmt_fast.attention as seam

    if kernel not in SDPA_KERNELS:
        raise ValueError(f"kernel must be one of {SDPA_KERNELS}, got {kernel!r}")
    real = seam.choose_backend
    seam.choose_backend = lambda *args, **kwargs: kernel
    try:
        yield
    finally:
        seam.choose_backend = real


def run_variant(base, inputs, dtype, options: dict | None, kernel: str | None, grad: bool) -> dict:
    """One run: ``base`` copied to ``dtype``, its step compiled with ``options`` (None: eager), under ``kernel``."""
    from rmt_fast.compiled import CompiledStep

    model = copy.deepcopy(base).to(dtype)
    if dtype == torch.float64 and model.settings.attn_backend == "triton":
        model.settings.attn_backend = "sdpa"  # the kernel has no float64: the reference runs SDPA
    step = "decoder_step" if model.is_decoder else "encoder_step"
    if options is not None:
        torch._dynamo.reset()  # compiles from scratch (a forced kernel is chosen at trace time)
        setattr(model, step, CompiledStep(model, step, dict(options)))
    rec = _Recorder(getattr(model, step))
    setattr(model, step, rec)
    t0 = time.perf_counter()
    with _forced(kernel):
        out = run(model, inputs, grad=grad)
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return dict(
        memory=rec.memory,
        logits=rec.logits,
        out=dict(memory=out.memory_state.detach(), logits=out.logits.detach(), loss=out.loss.detach()),
        grads=grads,
        seconds=seconds,
    )


def _err(x, ref) -> float | None:
    if x is None or ref is None:
        return None
    e = rel_err(x, ref)
    return e if math.isfinite(e) else float("nan")


def _errors(got: dict, want: dict, grad_names) -> dict:
    """Relative errors of one run against another (float64): per segment, outputs, worst gradient."""
    e = dict(
        segments=dict(
            memory=[_err(a, b) for a, b in zip(got["memory"], want["memory"])],
            logits=[_err(a, b) for a, b in zip(got["logits"], want["logits"])],
        ),
        memory=_err(got["out"]["memory"], want["out"]["memory"]),
        logits=_err(got["out"]["logits"], want["out"]["logits"]),
        loss=_err(got["out"]["loss"], want["out"]["loss"]),
    )
    if grad_names:  # a gradient missing where float64 has one counts as NaN
        worst = max(((_err(got["grads"].get(n), want["grads"][n]), n) for n in grad_names), key=_nan_first)
        e["grad"], e["grad_worst"] = (float("nan") if worst[0] is None else worst[0]), worst[1]
    if "memory" in want["grads"]:  # the memory parameter's gradient, whatever its norm (recorded, not judged)
        e["memory_grad"] = _err(got["grads"].get("memory"), want["grads"]["memory"])
    return e


def _apart(got: dict, eager: dict, grad_names) -> dict:
    """Compiled against eager directly (what the first CUDA test compared): final memory, the memory parameter's
    gradient, and the worst gradient over those whose eager norm is over 1e-3 (that test's selection)."""
    d = dict(memory=_err(got["out"]["memory"], eager["out"]["memory"]))
    if "memory" in eager["grads"]:
        d["memory_grad"] = _err(got["grads"].get("memory"), eager["grads"]["memory"])
    names = [n for n, g in eager["grads"].items() if g.float().norm() > GRAD_FLOOR]
    if names:
        d["grad"], d["grad_worst"] = max(
            ((_err(got["grads"].get(n), eager["grads"][n]), n) for n in names), key=_nan_first
        )
    return d


def _nan_first(pair):
    v = pair[0]
    return math.inf if v is None or not math.isfinite(v) else v


def variant_name(backend: str | None, kernel: str | None) -> str:
    """``"eager"`` (the step not compiled), ``"dynamo"``, ``"aot_eager"``, ``"inductor"``; ``"+<kernel>"`` where
    one SDPA kernel was forced."""
    name = backend or "eager"
    return name if kernel is None else f"{name}+{kernel}"


QUANTITIES = ("memory", "logits", "loss", "grad")


def _finite(errors: dict) -> bool:
    vals = [errors.get(k) for k in QUANTITIES] + errors["segments"]["memory"] + errors["segments"]["logits"]
    return all(v is None or math.isfinite(v) for v in vals)


def bound(eager: float | None, dtype: torch.dtype, factor: float = FACTOR) -> float:
    """The bound on a compiled run's error against float64, from eager's own: ``max(factor * eager, TOL[dtype])``."""
    return max(factor * (eager or 0.0), TOL[dtype])


def failures(errors: dict, eager: dict, dtype: torch.dtype, factor: float = FACTOR) -> list[str]:
    """The quantities (``memory``, ``logits``, ``loss``, ``grad``, ``segment <t> memory``, ...) where ``errors``
    (a compiled run against float64) exceeds :func:`bound` of ``eager`` (the eager run against float64), or is
    non-finite."""
    bad = []
    for key in QUANTITIES:
        if errors.get(key) is None:
            continue
        if not errors[key] <= bound(eager.get(key), dtype, factor):  # NaN fails
            bad.append(key)
    for key in ("memory", "logits"):
        for t, (got, ref) in enumerate(zip(errors["segments"][key], eager["segments"][key])):
            if got is not None and not got <= bound(ref, dtype, factor):
                bad.append(f"segment {t} {key}")
    return bad


def verdict(result: dict, factor: float = FACTOR) -> tuple[str, str]:
    """(verdict, explanation) for a :func:`diagnose` result (see the module docstring for the verdicts)."""
    dtype = DTYPES[result["dtype"]]
    variants = result["variants"]
    eager = variants["eager"]
    if not _finite(eager):
        return "eager-nonfinite", f"the eager {result['dtype']} step itself gives NaN or infinity against float64"
    failing = {}
    for name, errors in variants.items():
        if name.startswith("eager") or "error" in errors:
            continue
        ref = eager
        if "+" in name:  # a forced kernel: against the eager step with the same kernel, where it ran
            ref = variants.get(variant_name(None, name.split("+")[1]), eager)
            if "error" in ref:
                ref = eager
        bad = failures(errors, ref, dtype, factor)
        if bad:
            failing[name] = bad
    crashed = sorted(n for n, e in variants.items() if "error" in e)
    for backend in BACKENDS:  # the first stage that fails, plain kernels before forced ones
        if backend in failing:
            return f"compile-bug:{backend}", f"{backend} beyond the bound: {failing[backend]}"
        if backend in crashed:
            return f"compile-error:{backend}", f"{backend} did not run: {variants[backend]['error'][:300]}"
    if failing:
        name = sorted(failing)[0]
        return f"compile-bug:{name}", f"{name} beyond the bound: {failing[name]}"
    apart = [
        (v, f"{name} {key}")
        for name, direct in result.get("compiled_vs_eager", {}).items()
        for key, v in direct.items()
        if key in ("memory", "memory_grad", "grad") and v is not None and not v <= TOL[dtype]
    ]
    note = f"; runs that did not complete: {crashed}" if crashed else ""
    if apart:
        worst, where = max(apart)
        return (
            f"{SHORT[dtype]}-effect",
            f"every compiled run within max({factor:g} x eager's error, {TOL[dtype]:g}) of float64, yet compiled "
            f"and eager differ by up to {worst:.3g} ({where}): the {result['dtype']} rounding, not the compiler" + note,
        )
    return "ok", f"every compiled run within max({factor:g} x eager's error, {TOL[dtype]:g}) of float64" + note


def diagnose(
    model: str,
    device="cpu",
    dtype: torch.dtype = torch.float16,
    *,
    backends=BACKENDS,
    kernels=(),
    attn_backend: str = "auto",
    grad: bool = True,
    factor: float = FACTOR,
    reuse: dict | None = None,
    out=None,
) -> dict:
    """Run the variants and return the JSON-able result (with ``verdict`` and ``explanation``). ``reuse``: an
    earlier result of the same model, device and dtype whose variants are kept (only the missing ones run).
    ``out``: a JSON file written after every run (verdict ``"incomplete"`` until the last), so that a run stopped
    from outside leaves what it measured."""
    base, inputs = build(model, device, attn_backend=attn_backend)
    runs = {"float64": run_variant(base, inputs, torch.float64, None, None, grad)}
    ref = runs["float64"]
    grad_names = sorted(n for n, g in ref["grads"].items() if g.norm() > GRAD_FLOOR)
    result = dict(
        model=model,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        attn_backend=attn_backend,
        torch=torch.__version__,
        factor=factor,
        tol=TOL[dtype],
        segments=None,
        variants=dict(reuse["variants"]) if reuse else {},
        compiled_vs_eager=dict(reuse.get("compiled_vs_eager", {})) if reuse else {},
        eager_vs_eager=dict(reuse.get("eager_vs_eager", {})) if reuse else {},
    )
    if device != "cpu" and torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(torch.device(device))
    wanted = [(None, None)] + [(b, None) for b in backends]
    for kernel in kernels:
        wanted += [(None, kernel)] + [(b, kernel) for b in backends if b == "inductor"]
    for backend, kernel in wanted:
        name = variant_name(backend, kernel)
        if name in result["variants"] and name != "eager":
            continue
        options = None if backend is None else {"backend": COMPILE_BACKEND[backend], "dynamic": False}
        try:
            got = run_variant(base, inputs, dtype, options, kernel, grad)
        except Exception as exc:  # a forced kernel that cannot take the case, a compile error: recorded
            result["variants"][name] = dict(error=f"{type(exc).__name__}: {str(exc)[:400]}")
            continue
        finally:
            if options is not None:
                torch._dynamo.reset()
        runs[name] = got
        result["variants"][name] = dict(_errors(got, ref, grad_names), seconds=round(got["seconds"], 3))
        result["segments"] = len(got["memory"])
        if backend is not None and "eager" in runs:
            partner = runs.get(variant_name(None, kernel), runs["eager"])
            result["compiled_vs_eager"][name] = _apart(got, partner, grad_names)
        elif kernel is not None and "eager" in runs:  # the control: two eager runs, one SDPA kernel apart
            result["eager_vs_eager"][name] = _apart(got, runs["eager"], grad_names)
        if out is not None:
            write(dict(result, verdict="incomplete", explanation=f"stopped after {name}"), out)
    result["verdict"], result["explanation"] = verdict(result, factor)
    if out is not None:
        write(result, out)
    return result


def write(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    return path


def table(result: dict) -> str:
    """The result as text: one line per run, errors against float64 (``mem grad``: the memory parameter's
    gradient; ``vs eager``: that gradient against eager's, the first CUDA test's failing quantity)."""
    cols = (*QUANTITIES, "memory_grad")
    lines = [
        f"{result['model']} {result['device']} {result['dtype']} (attn_backend={result['attn_backend']}): "
        f"{result['verdict']}: {result['explanation']}",
        f"{'run':<24} {'memory':>9} {'logits':>9} {'loss':>9} {'grad':>9} {'mem grad':>9} {'vs eager':>9}"
        "  per-segment memory",
    ]
    for name, e in result["variants"].items():
        if "error" in e:
            lines.append(f"{name:<24} {e['error'][:90]}")
            continue
        cells = " ".join(_cell(e.get(k)) for k in cols)
        direct = {**result["compiled_vs_eager"], **result.get("eager_vs_eager", {})}.get(name, {})
        direct = _cell(direct.get("memory_grad"))
        seg = ", ".join(f"{v:.3g}" for v in e["segments"]["memory"])
        lines.append(f"{name:<24} {cells} {direct}  [{seg}]")
    return "\n".join(lines)


def _cell(v) -> str:
    return f"{'-':>9}" if v is None else f"{v:9.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--model", default="bert_cls", help="llama, gpt2, bert_cls (optionally @hdN)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated torch.compile backends")
    p.add_argument("--kernels", default="", help=f"comma-separated SDPA kernels to force too: {','.join(SDPA_KERNELS)}")
    p.add_argument("--attn-backend", default="auto", choices=("auto", "sdpa", "triton"))
    p.add_argument("--no-grad", action="store_true", help="forward only")
    p.add_argument("--out", default=None, help="the JSON file (default: print only)")
    a = p.parse_args(argv)
    result = diagnose(
        a.model,
        a.device,
        DTYPES[a.dtype],
        backends=[b for b in a.backends.split(",") if b],
        kernels=[k for k in a.kernels.split(",") if k],
        attn_backend=a.attn_backend,
        grad=not a.no_grad,
        out=a.out,
    )
    print(table(result))
    if a.out:
        print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

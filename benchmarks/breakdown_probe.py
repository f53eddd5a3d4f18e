"""The measuring half of ``rmt-fast-bench segment-breakdown``: profile FastRMT's encoder segment step and count
what runs per segment, by op or kernel name. Standalone (torch, transformers and ``rmt_fast`` only, no
relative imports), so that it can measure an older checkout of the project in a fresh process:

    python benchmarks/breakdown_probe.py --tree /tmp/old-checkout --variant graphed [--layers 12 ...]

prints one JSON record. ``--tree`` puts that checkout first on ``sys.path`` (after transformers has imported
Hugging Face's ``kernels``, which an old checkout's top-level ``kernels/`` folder would shadow).

Per variant (``eager``: the plain loop; ``graphed``: ``cuda_graph=True``, on the CPU the runner's static-buffer
path without capture; ``graphed+compiled``: plus ``compile_step``; ``train`` / ``train+compiled``: forward and
backward of a classifier with dropout 0.1, eager or with ``compile_step``), two calls of S and 2S segments are
profiled; per-segment counts are their difference / S, so per-call work (input checks, the segment plan, the
loss) drops out; times per segment are the longer call's / 2S (one profiled call each: indicative only).
Events inside the step (``StaticStep.__call__`` when graphed: what a CUDA graph captures;
``encoder_step`` otherwise; the whole forward and backward when training) and outside it (the host loop's
per-segment work) are kept apart. FLOPs: the forward's, per segment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter

if __name__ == "__main__":  # run as a script: its folder (benchmarks/profile.py!) must not shadow the stdlib
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

STEP_SCOPE = "segment step (rmt-fast-bench)"
OP_PREFIXES = ("aten::", "mkldnn::", "rmt_fast::", "prims::", "quantized::", "_c10d::")
GENERATED = ("cpp_fused", "triton_")  # inductor's generated kernels: graph_0_cpp_fused_..., triton_poi_fused_...
# ops that launch nothing: views, metadata, allocations, dropout (the probe runs in eval mode)
NO_KERNEL = {
    f"aten::{n}"
    for n in (
        "dropout",
        "view",
        "reshape",
        "_reshape_alias",
        "as_strided",
        "slice",
        "select",
        "expand",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "t",
        "alias",
        "_unsafe_view",
        "detach",
        "detach_",
        "empty",
        "empty_strided",
        "empty_like",
        "resolve_conj",
        "resolve_neg",
        "lift_fresh",
        "unbind",
        "split",
        "split_with_sizes",
        "chunk",
        "narrow",
        "view_as",
        "expand_as",
        "flatten",
        "unflatten",
        "contiguous",
        "to",
        "type_as",
        "_has_compatible_shallow_copy_type",
        "result_type",
        "is_nonzero",
        "item",
        "_local_scalar_dense",
        "size",
        "stride",
        "dim",
        "numel",
        "lift",
        "set_",
        "_reshape_copy",
        "movedim",
        "swapaxes",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "_nested_tensor_size",
        "requires_grad_",
        "retain_grad",
        "output_nr",
        "_version",
        "is_same_size",
        "record_stream",
    )
}


def _import_tree(tree: str | None):
    if tree:
        import transformers.modeling_utils  # noqa: F401  (Hugging Face's `kernels` first, if installed)

        for name in [k for k in sys.modules if k == "kernels" or k.startswith("kernels.")]:
            del sys.modules[name]
        sys.path.insert(0, tree)
    import rmt_fast

    return rmt_fast


def _is_op(name: str) -> bool:
    return name.startswith(OP_PREFIXES)


def _is_generated_kernel(name: str) -> bool:
    return name.startswith(GENERATED) or (name.startswith("graph_") and "cpp_fused" in name)


def _on_device(e) -> bool:
    return str(getattr(e, "device_type", "CPU")).endswith("CUDA")


def _count_events(events, cuda: bool) -> dict:
    """Per op name, split by in / out of the step scope: the top-level ops, i.e. the ops the Python code (or a
    compiled graph) calls, and inductor's generated kernels, with their CPU times (us). Each launches about one
    kernel on a GPU; views, allocations and ``dropout`` in eval mode launch none and are left out. On a GPU also
    every device kernel and copy, with its device time."""
    counts = {key: Counter() for key in ("ops_in", "ops_out", "op_us_in", "op_us_out")}
    for e in events:
        name = e.name
        if _on_device(e) or not (_is_op(name) or _is_generated_kernel(name)) or name in NO_KERNEL:
            continue
        p, in_scope = e.cpu_parent, False
        while p is not None:  # the nearest enclosing op; a view or `contiguous`, `to`, `dropout` is transparent
            if (_is_op(p.name) or _is_generated_kernel(p.name)) and p.name not in NO_KERNEL:
                break
            in_scope = in_scope or p.name == STEP_SCOPE
            p = p.cpu_parent
        if p is not None:  # nested in another op: not top level
            continue
        where = "in" if in_scope else "out"
        counts[f"ops_{where}"][name] += 1
        counts[f"op_us_{where}"][name] += e.cpu_time_total
    if cuda:  # a graph replay's kernels have no launching op: they are counted here, all of them
        counts["kernels"], counts["kernel_us"] = Counter(), Counter()
        for e in events:
            if _on_device(e):
                counts["kernels"][e.name] += 1
                counts["kernel_us"][e.name] += e.time_range.elapsed_us()
    return counts


@contextlib.contextmanager
def _scoped_step(rmt, graphed: bool):
    """Every step call inside ``record_function(STEP_SCOPE)``."""
    from torch.profiler import record_function

    if graphed:
        from rmt_fast import cuda_graph

        original = cuda_graph.StaticStep.__call__

        def call(self):
            with record_function(STEP_SCOPE):
                return original(self)

        cuda_graph.StaticStep.__call__ = call
        try:
            yield
        finally:
            cuda_graph.StaticStep.__call__ = original
        return
    own = vars(rmt).get("encoder_step")  # the CompiledStep of compile_step, or None (the method)
    step = rmt.encoder_step

    def scoped(*args, **kwargs):
        with record_function(STEP_SCOPE):
            return step(*args, **kwargs)

    rmt.encoder_step = scoped
    try:
        yield
    finally:
        if own is None:
            del rmt.encoder_step
        else:
            rmt.encoder_step = own


def _build(rmt_fast, a, device, dtype):
    import torch
    import transformers as tf

    cfg = tf.BertConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        intermediate_size=a.ffn,
        max_position_embeddings=a.positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    training = a.variant.startswith("train")
    if training:  # a classifier with bert's dropout, so the loss and the dropout kernels are counted too
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.1
        cfg.num_labels = 2
        model = tf.BertForSequenceClassification(cfg)
    else:
        model = tf.BertModel(cfg, add_pooling_layer=False)
    kw = {}
    if a.variant in ("graphed", "graphed+compiled"):
        kw["cuda_graph"] = True
    if a.variant.endswith("compiled"):
        import inspect

        if "compile_step" not in inspect.signature(rmt_fast.FastRMT.__init__).parameters:
            raise NotImplementedError("this checkout's FastRMT has no compile_step")
        kw["compile_step"] = json.loads(a.compile_options) if a.compile_options else True
    segment = a.positions - a.mem - 3
    rmt = rmt_fast.FastRMT(model, a.mem, segment, cls_token_id=101, sep_token_id=102, pad_token_id=0, **kw)
    rmt = rmt.to(device=device, dtype=dtype)
    return (rmt.train() if training else rmt.eval()), segment


def _flops(rmt, ids_s, ids_2s, segments: int) -> float | None:
    """FLOPs per segment (FlopCounterMode, difference of the two calls); the CPU's SDPA kernel is not in the
    counter's registry, so its products are added by hand (2 * 2 * T * T * d per layer, bidirectional)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for ids in (ids_s, ids_2s):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            rmt(ids, return_logits=False)
        counts.append(counter.get_total_flops())
    return (counts[1] - counts[0]) / segments


def probe(a) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    rmt_fast = _import_tree(a.tree)
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # generated CPU kernels show up as profiler events
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    try:
        rmt, segment = _build(rmt_fast, a, device, dtype)
    except NotImplementedError as exc:
        return {"unavailable": str(exc)}
    vocab_lo = 103
    gen = torch.Generator().manual_seed(1)
    s = a.segments
    ids_s = torch.randint(vocab_lo, a.vocab, (a.batch, s * segment), generator=gen).to(device)
    ids_2s = torch.randint(vocab_lo, a.vocab, (a.batch, 2 * s * segment), generator=gen).to(device)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    graphed = a.variant in ("graphed", "graphed+compiled")
    training = a.variant.startswith("train")
    labels = torch.zeros(a.batch, dtype=torch.long, device=device)

    def call(ids):
        if training:  # forward and backward, all inside the scope (the loss of the last segment)
            from torch.profiler import record_function

            with record_function(STEP_SCOPE):
                rmt(ids, labels=labels, return_logits=False).loss.backward()
        else:
            rmt(ids, return_logits=False)

    with torch.no_grad() if not training else contextlib.nullcontext():
        for _ in range(2):  # warm-up: capture, compile
            call(ids_s)
            call(ids_2s)
        if cuda:
            torch.cuda.synchronize()
        counted = []
        for ids in (ids_s, ids_2s):
            scope = _scoped_step(rmt, graphed) if not training else contextlib.nullcontext()
            with scope, profile(activities=acts) as prof:
                call(ids)
                if cuda:
                    torch.cuda.synchronize()
            counted.append(_count_events(prof.events(), cuda))
    per_segment = {}
    for key in counted[0]:
        if "_us" in key:  # times: the longer call's / its segments (a difference of two timings is noise)
            per_segment[key] = {k: v / (2 * s) for k, v in counted[1][key].items() if v}
            continue
        diff = Counter(counted[1][key])
        diff.subtract(counted[0][key])
        per_segment[key] = {k: v / s for k, v in diff.items() if v}
    per_call = {}
    for key in ("ops_in", "ops_out"):
        fixed = Counter(counted[0][key])
        fixed.subtract({k: v * s for k, v in per_segment[key].items()})
        per_call[key] = {k: v for k, v in fixed.items() if abs(v) > 1e-9}
    flops = None
    if not a.no_flops:
        # forward FLOPs of the eager inference step: the same products as every variant's forward
        eager, _ = _build(rmt_fast, argparse.Namespace(**{**vars(a), "variant": "eager"}), device, dtype)
        flops = _flops(eager, ids_s, ids_2s, s)
        cfg = eager.model.config
        flops += cfg.num_hidden_layers * 4 * a.batch * a.positions**2 * cfg.hidden_size  # SDPA (see _flops)
    git = None
    try:
        import subprocess

        root = a.tree or __file__.rsplit("/", 2)[0]
        git = (
            subprocess.run(
                ["git", "-C", root, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:
        pass
    return {
        "variant": a.variant,
        "tree": a.tree,
        "commit": git,
        "segment": segment,
        "segments_per_call": s,
        "per_segment": per_segment,
        "per_call": per_call,
        "flops_per_segment": flops,
        "device": str(device),
        "dtype": a.dtype,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=None, help="a checkout of rmt-fast to measure (default: the importable one)")
    p.add_argument(
        "--variant", default="graphed", choices=("eager", "graphed", "graphed+compiled", "train", "train+compiled")
    )
    p.add_argument("--compile-options", default=None, help="compile_step as JSON (default: true)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--mem", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-flops", action="store_true")
    return p


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    print(json.dumps(probe(parser().parse_args())))

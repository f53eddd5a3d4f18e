"""Training throughput and peak memory against the number of segments: ReferenceRMT, FastRMT, full attention.

One point = one method at one number of segments: two warm-up training steps (compilation and autotuning happen
there), then a few measured steps. A training step is forward, backward and an AdamW step, full BPTT, under
bf16 autocast on CUDA (fp32 weights; fp32 on the CPU). Methods:

* ``reference``: ReferenceRMT;
* ``fast``: FastRMT, ``attn_backend="auto"`` (the best backend from the dispatch table);
* ``fast-ckpt``: FastRMT with ``gradient_checkpointing=True``;
* ``fast-compiled``: FastRMT with ``compile_step`` (inductor on CUDA; ``aot_eager`` in the CPU smoke run);
* ``full``: the same backbone over the whole input, its positions extended to the total length, through
  transformers' SDPA attention (flash on CUDA), until it no longer fits.

Settings:

* ``a`` (the paper's): bert-base (BertForSequenceClassification), 499 tokens + 10 memory per segment
  (512 positions), batch 32, sequence labels on the last segment;
* ``b`` (a decoder): a Llama-style config of ~1.2B parameters (hidden 2048, 16 layers, 32 query / 8 KV heads,
  FFN 8192, vocabulary 128,256, tied embeddings), segments of 1024 tokens, m = 16, batch 4, causal-LM loss;
  FastRMT with checkpointing also at 64 segments;
* ``tiny`` (the CPU default): a 2-layer BERT and a 2-layer Llama, segments 1, 2, 4; well under a minute.

``--quick`` on CUDA (the device check, ~100 s with a 70 s budget): (a) at 1 and 7 segments, (b) at 8 and 64
(checkpointed), without ``fast-compiled`` (its compilation alone takes about a minute; ``--methods`` adds it).
The CSV is rewritten after every point, so a run stopped from outside keeps the rows it measured.

Timing: CUDA events around the measured steps (CPU: ``time.perf_counter``). Peak memory: CUDA
``max_memory_allocated`` over the measured steps, which includes weights, gradients and AdamW states (``base_mb``
is what is allocated before a step, ``act_peak_mb`` the difference); CPU: the growth of the peak resident set
(``rmt_fast.bench.common.PeakMemory``, a lower bound). Every point is a row: ``ok``, ``oom`` (out of memory;
memory is freed and the sweep goes on; a method's longer points after an OOM are ``oom`` rows too, not run),
``over budget`` (the ``--budget-s`` wall-clock budget was spent before the point), or ``error: ...``. The loss of
every step must be finite. The JSON summary holds the issue's target ratios: FastRMT against ReferenceRMT at 7
segments of (a) and 8 of (b) (tokens/s >= 1.5x, peak memory <= 0.5x), and 64 segments of (b) with
checkpointing (fits in 80 GB).

    rmt-fast-bench train [--out DIR] [--quick] [--setting a,b|tiny] [--segments 1,2,4] [--methods fast,reference]
                         [--budget-s 600]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .common import PeakMemory, env_info, machine_label, module_main, save_plot, write_csv, write_json

METHODS = ("reference", "fast", "fast-ckpt", "full", "fast-compiled")  # the order they run in
FAST_METHODS = ("fast", "fast-ckpt", "fast-compiled")
SPEEDUP_TARGET, MEMORY_TARGET = 1.5, 0.5
CKPT_TARGET_BYTES = 80e9
DEFAULT_BUDGET_S = {True: 70.0, False: 1800.0}  # quick / full, on CUDA (quick: the device check, ~100 s)
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


@dataclass
class Setting:
    name: str
    kind: str  # "encoder" or "decoder"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    mem: int
    segment: int  # content tokens per segment
    batch: int
    segments: list[int]
    quick_segments: list[int]
    target_segments: int | None = None  # the ratio point
    ckpt_segments: list[int] = field(default_factory=list)  # extra points for fast-ckpt
    quick_methods: tuple[str, ...] = METHODS
    compile_step: object = True

    @property
    def positions(self) -> int:
        """Model positions per RMT segment."""
        return self.segment + (self.mem + 3 if self.kind == "encoder" else 2 * self.mem)


SETTINGS: dict[str, Setting] = {
    "a": Setting("a", "encoder", 12, 768, 12, 12, 3072, 30522, 10, 499, 32, [1, 2, 4, 7, 8, 16, 32], [1, 7],
                 target_segments=7, quick_methods=("reference", "fast", "fast-ckpt", "full")),  # fmt: skip
    "b": Setting("b", "decoder", 16, 2048, 32, 8, 8192, 128256, 16, 1024, 4, [1, 2, 4, 8, 16, 32], [8],
                 target_segments=8, ckpt_segments=[64],
                 quick_methods=("reference", "fast", "fast-ckpt", "full")),  # fmt: skip
    "tiny-encoder": Setting("tiny-encoder", "encoder", 2, 64, 2, 2, 128, 1000, 4, 32, 2, [1, 2, 4], [1, 2],
                            compile_step={"backend": "aot_eager"}),  # fmt: skip
    "tiny-decoder": Setting("tiny-decoder", "decoder", 2, 64, 4, 2, 128, 1000, 4, 32, 2, [1, 2, 4], [1, 2],
                            compile_step={"backend": "aot_eager"}),  # fmt: skip
}
ALIASES = {"tiny": ["tiny-encoder", "tiny-decoder"]}


# ------------------------------------------------------------------------------------------------- models
def _backbone(s: Setting, max_positions: int, device):
    """The setting's backbone (fp32, training mode) with room for ``max_positions`` positions."""
    import torch

    torch.manual_seed(0)
    if s.kind == "encoder":
        from transformers import BertForSequenceClassification

        from .latency import Setup, _bert_config

        shape = Setup(layers=s.layers, hidden=s.hidden, heads=s.heads, ffn=s.ffn, vocab=s.vocab, mem=s.mem,
                      positions=s.positions, dtype="float32", rmt_lengths=[], full_lengths=[], per_call_budget_s=0.0,
                      sweep_budget_s=0.0, repeats=1, cls_token_id=CLS_ID, sep_token_id=SEP_ID,
                      pad_token_id=PAD_ID)  # fmt: skip
        config = _bert_config(shape, max_positions, "sdpa")  # latency's full-attention config: positions extended
        config.num_labels = 2
        cls = BertForSequenceClassification
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                             num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                             max_position_embeddings=max(max_positions, s.positions), tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID,
                             attn_implementation="sdpa")  # fmt: skip
        cls = LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    return model.train()


def _build(s: Setting, method: str, device, max_segments: int):
    """(module to optimize, step call: (ids, labels) -> loss)."""
    from rmt_fast import FastRMT, ReferenceRMT

    if method == "full":
        model = _backbone(s, max_segments * s.segment, device)
        return model, lambda ids, labels: model(input_ids=ids, labels=labels).loss
    model = _backbone(s, s.positions, device)
    kw = dict(cls_token_id=CLS_ID, sep_token_id=SEP_ID, pad_token_id=PAD_ID) if s.kind == "encoder" else {}
    if method == "reference":
        rmt = ReferenceRMT(model, s.mem, s.segment, **kw)
    else:
        rmt = FastRMT(model, s.mem, s.segment, attn_backend="auto", gradient_checkpointing=method == "fast-ckpt",
                      compile_step=s.compile_step if method == "fast-compiled" else False, **kw)  # fmt: skip
    rmt = rmt.to(device)
    return rmt, lambda ids, labels: rmt(ids, labels=labels, return_logits=False).loss


def _inputs(s: Setting, n: int, device):
    import torch

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(CLS_ID + 2, s.vocab, (s.batch, n * s.segment), generator=g).to(device)
    labels = torch.randint(0, 2, (s.batch,), generator=g).to(device) if s.kind == "encoder" else ids
    return ids, labels


# ------------------------------------------------------------------------------------------------ measuring
def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free(cuda: bool):
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _measure(opt, loss_fn, ids, labels, reps: int, cuda: bool) -> dict:
    """Two warm-up steps (the second catches one-time recompiles, e.g. transformers setting
    ``config.problem_type`` on its first call), then ``reps`` timed steps (forward, backward, AdamW)."""
    import torch

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    t0 = time.perf_counter()
    losses = [step(), step()]
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    peak = PeakMemory(cuda)
    base_mb = torch.cuda.memory_allocated() / 2**20 if cuda else None
    token = peak.start()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        losses += [step() for _ in range(reps)]
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / reps
    else:
        t1 = time.perf_counter()
        losses += [step() for _ in range(reps)]
        seconds = (time.perf_counter() - t1) / reps
    peak_mb = peak.mb(token)
    values = torch.stack(losses).float().cpu()
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"loss not finite: {values.tolist()}")
    return dict(step_ms=1e3 * seconds, peak_mb=peak_mb, base_mb=base_mb, warmup_s=warmup_s,
                loss=float(values[-1]))  # fmt: skip


def _sweep(s: Setting, methods, segments, device, reps, deadline, clock, fail_hook, bar, sink) -> list[dict]:
    """One setting's points; ``sink(rows)`` after each point (the CSV so far: a killed run keeps its rows)."""
    import torch

    cuda = device.type == "cuda"
    rows = []
    for method in methods:
        points = list(segments) + ([n for n in s.ckpt_segments if n not in segments] if method == "fast-ckpt" else [])
        module = opt = loss_fn = None
        oom_at = None
        for n in points:
            row = dict(setting=s.name, method=method, segments=n, batch=s.batch, tokens=s.batch * n * s.segment,
                       status="", step_ms=None, tokens_per_s=None, peak_mb=None, base_mb=None, act_peak_mb=None,
                       warmup_s=None, loss=None, note="")  # fmt: skip
            rows.append(row)
            bar.update(1)
            if clock() > deadline:
                row["status"] = "over budget"
                continue
            if oom_at is not None:
                row.update(status="oom", note=f"not run: out of memory at {oom_at} segments")
                continue
            failure = None
            try:
                if fail_hook is not None:
                    fail_hook(s.name, method, n)
                if module is None:
                    module, loss_fn = _build(s, method, device, max(points))
                    opt = torch.optim.AdamW(module.parameters(), lr=1e-6, foreach=cuda)
                ids, labels = _inputs(s, n, device)
                # the long checkpointed points are there for their memory: one measured step
                res = _measure(opt, loss_fn, ids, labels, 1 if n not in segments else reps, cuda)
                row.update(status="ok", tokens_per_s=row["tokens"] / (res["step_ms"] / 1e3), **res)
                if res["base_mb"] is not None and res["peak_mb"] is not None:
                    row["act_peak_mb"] = res["peak_mb"] - res["base_mb"]
            except Exception as exc:  # a point that fails is a row, not a crash
                failure = exc
            if failure is not None:
                if is_oom(failure):
                    row.update(status="oom", note=type(failure).__name__)
                    oom_at = n
                else:
                    row.update(status="error", note=f"{type(failure).__name__}: {str(failure)[:200]}")
                failure = None
                if module is not None:
                    module.zero_grad(set_to_none=True)
                if opt is not None:
                    opt.state.clear()
                _free(cuda)
            for key in ("step_ms", "tokens_per_s", "peak_mb", "base_mb", "act_peak_mb", "warmup_s", "loss"):
                if isinstance(row[key], float):
                    row[key] = round(row[key], 4)
            sink(rows)
        module = opt = loss_fn = None
        if method == "fast-compiled":
            torch._dynamo.reset()  # frees compiled graphs; the next setting starts below dynamo's recompile limit
        _free(cuda)
    return rows


# ------------------------------------------------------------------------------------------------ summary
def _ok(rows, setting, method, n):
    return next((r for r in rows if r["setting"] == setting and r["method"] == method and r["segments"] == n
                 and r["status"] == "ok"), None)  # fmt: skip


def targets(rows, settings: list[Setting]) -> dict:
    """The issue's ratios: each FastRMT variant against ReferenceRMT at the setting's target segment count,
    and the checkpointed long point."""
    out = {}
    for s in settings:
        if s.target_segments is not None:
            n = s.target_segments
            ref = _ok(rows, s.name, "reference", n)
            entry = {}
            for m in FAST_METHODS:
                r = _ok(rows, s.name, m, n)
                if ref is None or r is None:
                    entry[m] = None
                    continue
                speed = r["tokens_per_s"] / ref["tokens_per_s"]
                mem = r["peak_mb"] / ref["peak_mb"] if r["peak_mb"] and ref["peak_mb"] else None
                act = (r["act_peak_mb"] / ref["act_peak_mb"] if r["act_peak_mb"] is not None and ref["act_peak_mb"]
                       else None)  # fmt: skip
                entry[m] = dict(speedup=round(speed, 3), peak_ratio=None if mem is None else round(mem, 3),
                                activation_peak_ratio=None if act is None else round(act, 3),
                                meets_speedup=speed >= SPEEDUP_TARGET,
                                meets_memory=None if mem is None else mem <= MEMORY_TARGET)  # fmt: skip
            out[f"{s.name}@{n}"] = entry
        for n in s.ckpt_segments:
            r = next((r for r in rows if r["setting"] == s.name and r["method"] == "fast-ckpt"
                      and r["segments"] == n), None)  # fmt: skip
            if r is not None:
                peak = r["peak_mb"]
                out[f"{s.name}@{n} fast-ckpt"] = dict(status=r["status"], peak_gb=None if peak is None else
                                                      round(peak * 2**20 / 1e9, 2),
                                                      fits_80GB=r["status"] == "ok" and peak is not None
                                                      and peak * 2**20 <= CKPT_TARGET_BYTES)  # fmt: skip
    return out


def _plot(rows, settings: list[Setting], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
    for (ax_t, ax_m), s in zip(axes, settings):
        for method in METHODS:
            pts = sorted((r["segments"], r["tokens_per_s"], r["peak_mb"]) for r in rows
                         if r["setting"] == s.name and r["method"] == method and r["status"] == "ok")  # fmt: skip
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax_t.plot(x, [p[1] for p in pts], marker="o", label=method)
            if all(p[2] is not None for p in pts):
                ax_m.plot(x, [p[2] for p in pts], marker="o", label=method)
        title = (f"({s.name}) {s.kind}, {s.layers}L/{s.hidden}d, {s.segment}+{s.mem} mem per segment, "
                 f"batch {s.batch}")  # fmt: skip
        for ax, ylabel in ((ax_t, "tokens/s (training step)"), (ax_m, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("segments")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=8)
            ax.grid(True, alpha=0.3)
        if ax_t.get_legend_handles_labels()[0]:
            ax_t.legend(fontsize=7)
    fig.suptitle(f"RMT training: forward + backward + AdamW ({machine_label()})", fontsize=10)
    save_plot(fig, path)


# ------------------------------------------------------------------------------------------------ entry points
def resolve_settings(names: list[str] | None, cuda: bool) -> list[Setting]:
    names = names or (["a", "b"] if cuda else ["tiny"])
    out = []
    for name in names:
        for key in ALIASES.get(name, [name]):
            if key not in SETTINGS:
                raise ValueError(f"--setting: unknown setting {name!r}; expected one of a, b, tiny")
            out.append(SETTINGS[key])
    return out


def run(out_dir: Path, quick: bool = False, *, settings: list[str] | None = None, segments: list[int] | None = None,
        methods: list[str] | None = None, budget_s: float | None = None, reps: int | None = None,
        fail_hook: Callable[[str, str, int], None] | None = None,
        clock: Callable[[], float] = time.perf_counter) -> dict:  # fmt: skip
    """Sweep and write train.csv, train.json and train.png to ``out_dir``; returns the summary.

    ``fail_hook(setting, method, segments)`` runs inside each point's error handling before the step (tests
    raise a simulated ``torch.OutOfMemoryError`` there)."""
    import torch
    from tqdm import tqdm

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    chosen = resolve_settings(settings, cuda)
    if methods is not None:
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    if segments is not None and (not segments or any(not isinstance(n, int) or n < 1 for n in segments)):
        raise ValueError(f"--segments: expected positive ints, got {segments}")
    if budget_s is None:
        budget_s = DEFAULT_BUDGET_S[quick] if cuda else 120.0
    if reps is None:
        reps = (2 if quick else 3) if cuda else 1  # the CPU run is a smoke run: one measured step
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = []
    for s in chosen:
        ms = [m for m in METHODS if (methods is None and (not quick or m in s.quick_methods))
              or (methods is not None and m in methods)]  # fmt: skip
        segs = segments if segments is not None else (s.quick_segments if quick else s.segments)
        plan.append((s, ms, segs))
    total = sum(len(ms) * len(segs) + (len([n for n in s.ckpt_segments if n not in segs]) if "fast-ckpt" in ms
                                       else 0) for s, ms, segs in plan)  # fmt: skip
    t0 = clock()
    deadline = t0 + budget_s
    rows = []
    with tqdm(total=total, desc="train") as bar:
        for s, ms, segs in plan:
            bar.set_postfix_str(f"setting {s.name}")
            done = list(rows)
            rows += _sweep(s, ms, segs, device, reps, deadline, clock, fail_hook, bar,
                           lambda new, done=done: write_csv(out_dir / "train.csv", done + new))  # fmt: skip
    summary = {
        "device": machine_label(),
        "seconds": round(clock() - t0, 1),
        "budget_s": budget_s,
        "points": len(rows),
        "ok_points": sum(r["status"] == "ok" for r in rows),
        "oom_points": sum(r["status"] == "oom" for r in rows),
        "over_budget_points": sum(r["status"] == "over budget" for r in rows),
        "error_points": sum(r["status"] == "error" for r in rows),
        "targets": targets(rows, chosen),
    }
    summary["ok"] = summary["error_points"] == 0
    write_csv(out_dir / "train.csv", rows)
    write_json(out_dir / "train.json", {"summary": summary, "settings": [vars(s) for s, _, _ in plan],
                                        "methods": {s.name: ms for s, ms, _ in plan}, "reps": reps,
                                        "precision": "bf16 autocast, fp32 weights" if cuda else "fp32",
                                        "rows": rows, "env": env_info()})  # fmt: skip
    _plot(rows, chosen, out_dir / "train.png")
    return summary


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", type=_names, default=None, help="a, b, tiny (comma-separated; default: a,b on "
                   "CUDA, tiny on the CPU)")  # fmt: skip
    p.add_argument("--segments", type=_ints, default=None, help="segment counts, e.g. 1,2,4,8")
    p.add_argument("--methods", type=_names, default=None, help=f"some of {','.join(METHODS)}")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget; later points: 'over budget'")
    p.add_argument("--reps", type=int, default=None, help="measured steps per point (after two warm-up steps)")


def run_args(out_dir: Path, quick: bool, args: argparse.Namespace) -> dict:
    return run(out_dir, quick, settings=args.setting, segments=args.segments, methods=args.methods,
               budget_s=args.budget_s, reps=args.reps)  # fmt: skip


def main(argv=None) -> int:
    return module_main(sys.modules[__name__], argv, default_out="results/train", ok_key="ok")


if __name__ == "__main__":
    sys.exit(main())

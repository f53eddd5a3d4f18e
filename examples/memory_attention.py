"""Draw the attention maps of RMT memory operations (arXiv 2304.11062, Figure 6) for one 4-segment example.

    python examples/memory_attention.py --out DIR [--model examples/results/memory_attention/model]

loads an RMT saved by ``examples/train_memory_task.py --save-model`` (a Detect & Memorize model by default:
``--task`` must match what it was trained on), or, without ``--model``, trains a tiny one first
(``train_memory_task.py --task detect --save-model`` with ``--train-budget`` seconds, into DIR/train). It then
picks a 4-segment example whose fact lies wholly inside the first segment (so segments 2 and 3 hold no fact and
the last one holds the question), reruns it through :func:`rmt_fast.memory_attention.memory_attention`, and
writes

* DIR/memory_attention.png: one attention map per segment (the layer and head where the write slots look at
  the fact most; the last panel: the layer and head where [CLS] / the answering token reads memory most), the
  fact's tokens in red, the memory slots in blue;
* DIR/memory_attention.json:
  - ``fact_share_write``: the largest, over layers and heads, share of the write slots' attention mass that
    falls on the fact's tokens, in the segment that holds the fact;
  - ``uniform_share``: the fact tokens' fraction of that segment's visible positions (what uniform attention
    would give them); ``uniform_share_content``: their fraction of its content tokens;
  - ``read_share``: the largest, over layers and heads, share of the answering token's attention that goes to
    the read-memory slots in the last segment (``read_share_mean``: its mean over layers and heads;
    ``uniform_read_share``: the read slots' fraction of the visible positions);
  - per segment and layer, the head-mean and max of the write slots' share on the fact and on the memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from rmt_fast import FastRMT  # noqa: E402
from rmt_fast.memory_attention import memory_attention  # noqa: E402
from rmt_fast.tasks import ANSWERS, TASKS, VOCAB, make_example  # noqa: E402

N_SEGMENTS = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder for memory_attention.png and .json")
    p.add_argument(
        "--model",
        default=None,
        help="a saved RMT (train_memory_task.py --save-model's DIR/model); "
        "without it a tiny Detect & Memorize model is trained first",
    )
    p.add_argument("--task", choices=TASKS, default="detect", help="the task the model was trained on")
    p.add_argument("--train-budget", type=float, default=120.0, help="seconds of training without --model")
    p.add_argument("--seed", type=int, default=0, help="seed of the example search")
    return p.parse_args(argv)


def load_or_train(args) -> FastRMT:
    if args.model is not None:
        return FastRMT.from_pretrained(args.model)
    import train_memory_task

    train_dir = os.path.join(args.out, "train")
    train_memory_task.main(
        [
            "--task",
            args.task,
            "--out",
            train_dir,
            "--save-model",
            "--time-budget",
            str(args.train_budget),
            "--eval-segments",
            "1,4,8",
        ]
    )
    return FastRMT.from_pretrained(os.path.join(train_dir, "model"))


def pick_example(rmt: FastRMT, task: str, seed: int, tries: int = 2000):
    """The first seeded 4-segment example whose first fact lies wholly in segment 0, every other fact wholly in
    one segment, with a fact-free segment before the last; preferably one the model answers correctly."""
    size = rmt.segment_size
    rng = random.Random(f"memory-attention/{task}/{seed}")
    fallback = None
    for _ in range(tries):
        ex = make_example(task, N_SEGMENTS, size, rng, decoder=rmt.is_decoder, return_example=True)
        segs = [a // size for a, _ in ex.fact_spans]
        whole = all(a // size == (b - 1) // size for a, b in ex.fact_spans)
        if not (whole and min(segs) == 0 and set(range(1, N_SEGMENTS - 1)) - set(segs)):
            continue
        fallback = fallback or ex
        if predict(rmt, ex) == ex.label:
            return ex, True
    if fallback is None:
        raise RuntimeError(f"no {task} example with the fact in the first segment in {tries} tries")
    return fallback, False


def answer_scores(rmt: FastRMT, logits: torch.Tensor) -> torch.Tensor:
    from rmt_fast.tasks import ANSWER_TOKEN_IDS

    return logits[:, -2, list(ANSWER_TOKEN_IDS)] if rmt.is_decoder else logits


@torch.no_grad()
def predict(rmt: FastRMT, ex) -> int:
    rmt.eval()
    return int(answer_scores(rmt, rmt(torch.tensor([ex.input_ids])).logits).argmax(-1))


def _share(x: torch.Tensor) -> float:
    """A share of attention mass (a float64 sum of float64 probabilities) as a float in [0, 1]."""
    if x.dtype != torch.float64:
        raise ValueError(f"shares are computed in float64, got {x.dtype}")
    return min(max(float(x), 0.0), 1.0)


def analyse(rmt: FastRMT, ex) -> tuple[dict, object]:
    ids = torch.tensor([ex.input_ids])
    # The rerun and every share are float64: a share summed from fp32 probabilities can round past 1
    # (1.0000001); in float64 the rounding is ~1e-16, and _share clamps that last ulp to the share's range.
    rmt64 = copy.deepcopy(rmt).double()
    # Decoders: the answer is predicted from the token before the answer word (the question's "?").
    result = memory_attention(rmt64, ids, answer_token=-2 if rmt.is_decoder else None, full=True)
    segs = result.segments
    fact_masks = [[s.columns(a, b)[0] for s in segs] for a, b in ex.fact_spans]
    facts = []
    for (a, b), masks in zip(ex.fact_spans, fact_masks):
        t = next(i for i, mk in enumerate(masks) if mk.any())
        seg = segs[t]
        shares = torch.stack([seg.write_share(layer, masks[t][None])[0] for layer in range(seg.num_layers)])
        layer, head = divmod(int(shares.argmax()), shares.shape[1])
        visible = int(seg.key_valid[0].sum())
        content = int((seg.source_positions[0] >= 0).sum())
        facts.append(
            dict(
                span=[a, b],
                words=[VOCAB[i] for i in ex.input_ids[a:b]],
                segment=t,
                fact_share_write=_share(shares.max()),
                best_layer=layer,
                best_head=head,
                uniform_share=(b - a) / visible,
                uniform_share_content=(b - a) / content,
            )
        )
    last = segs[-1]
    reads = torch.stack([last.read_share(layer)[0] for layer in range(last.num_layers)])
    read_layer, read_head = divmod(int(reads.argmax()), reads.shape[1])
    per_segment = []
    for t, seg in enumerate(segs):
        fact_keys = torch.stack([masks[t] for masks in fact_masks]).any(0)[None]
        memory_keys = torch.zeros_like(seg.key_valid)
        memory_keys[:, seg.read_slots.start : seg.read_slots.stop] = True
        layers = []
        for layer in range(seg.num_layers):
            on_fact = seg.write_share(layer, fact_keys)[0]
            on_memory = seg.write_share(layer, memory_keys)[0]
            layers.append(
                dict(
                    layer=layer,
                    fact_share_mean=_share(on_fact.mean()),
                    fact_share_max=_share(on_fact.max()),
                    memory_share_mean=_share(on_memory.mean()),
                    memory_share_max=_share(on_memory.max()),
                )
            )
        per_segment.append(dict(segment=t, holds_fact=bool(fact_keys.any()), write=layers))
    first = facts[0]
    out = {
        "task": None,
        "kind": result.kind,
        "num_mem_tokens": result.num_mem_tokens,
        "segment_size": rmt.segment_size,
        "fact_share_write": first["fact_share_write"],
        "uniform_share": first["uniform_share"],
        "uniform_share_content": first["uniform_share_content"],
        "fact_over_uniform": first["fact_share_write"] / first["uniform_share"],
        "write_layer": first["best_layer"],
        "write_head": first["best_head"],
        "read_share": _share(reads.max()),
        "read_share_mean": _share(reads.mean()),
        "uniform_read_share": result.num_mem_tokens / int(last.key_valid[0].sum()),
        "read_layer": read_layer,
        "read_head": read_head,
        "facts": facts,
        "segments": per_segment,
        "answer": ex.answer,
        "predicted": ANSWERS[int(answer_scores(rmt, result.logits).argmax(-1))],
        "text": ex.text,
    }
    return out, result


def _labels(seg) -> list[str]:
    m_start = seg.read_slots.start
    labels = []
    for p, i in enumerate(seg.ids[0].tolist()):
        if i < 0:
            slot = p - (m_start if p in seg.read_slots else seg.write_slots.start)
            labels.append(
                f"mem{slot}" + ("" if seg.read_slots == seg.write_slots else (" r" if p in seg.read_slots else " w"))
            )
        else:
            labels.append(VOCAB[i])
    return labels


def plot(path: str, stats: dict, result, ex):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    segs = result.segments
    fact_segments = {f["segment"] for f in stats["facts"]}
    cols = 2
    rows = -(-len(segs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 6.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(segs) :]:
        ax.axis("off")
    for t, (ax, seg) in enumerate(zip(axes.flat, segs)):
        last = t == len(segs) - 1
        layer, head = (stats["read_layer"], stats["read_head"]) if last else (stats["write_layer"], stats["write_head"])
        probs = seg.probs[layer][0, head].numpy()
        n = int(seg.key_valid[0].sum()) if result.kind == "encoder" else probs.shape[0]
        image = ax.imshow(probs[:n, :n], cmap="viridis", vmin=0, vmax=1)
        labels = _labels(seg)[:n]
        fact = torch.zeros(n, dtype=torch.bool)
        for a, b in ex.fact_spans:
            fact |= seg.columns(a, b)[0, :n]
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yticklabels(labels, fontsize=6)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for p, tick in enumerate(ticks):
                if fact[p]:
                    tick.set_color("red")
                    tick.set_fontweight("bold")
                elif labels[p].startswith("mem"):
                    tick.set_color("tab:blue")
        w0, w1 = seg.write_slots.start, seg.write_slots.stop
        r0, r1 = seg.read_slots.start, seg.read_slots.stop
        if fact.any():
            where = fact.nonzero()[:, 0]
            ax.add_patch(
                Rectangle(
                    (int(where.min()) - 0.5, w0 - 0.5),
                    int(where.max()) - int(where.min()) + 1,
                    w1 - w0,
                    fill=False,
                    ec="red",
                    lw=2,
                )
            )
        if last:
            q = seg.answer_position
            ax.add_patch(Rectangle((r0 - 0.5, q - 0.5), r1 - r0, 1, fill=False, ec="orange", lw=2))
            share = seg.read_share(layer)[0, head].item()
            what = "[CLS]" if result.kind == "encoder" else "the answering token"
            title = (
                f"({'abcd'[t]}) segment {t + 1}: {what} reads memory to answer\n{share:.0%} of its attention on memory"
            )
        elif t in fact_segments:
            memo = stats["facts"][[f["segment"] for f in stats["facts"]].index(t)]
            title = (
                f"({'abcd'[t]}) segment {t + 1}: the fact is written to memory\n"
                f"{memo['fact_share_write']:.0%} of the write slots' attention on the fact "
                f"(uniform {memo['uniform_share']:.0%})"
            )
        else:
            memory_keys = torch.zeros_like(seg.key_valid)
            memory_keys[:, r0:r1] = True
            share = seg.write_share(layer, memory_keys)[0, head].item()
            title = (
                f"({'abcd'[t]}) segment {t + 1}: no fact, memory kept as is\n"
                f"{share:.0%} of the write slots' attention on memory"
            )
        ax.set_title(f"{title}\nlayer {layer}, head {head}", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        if t % cols == 0:
            ax.set_ylabel("query position", fontsize=8)
    fig.suptitle(
        f"RMT memory operations, {stats['task']} ({result.kind}, m = {result.num_mem_tokens}): "
        f"answer {stats['answer']!r}, predicted {stats['predicted']!r}\nred = the fact, "
        "blue = memory slots",
        fontsize=10,
    )
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention probability")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    rmt = load_or_train(args)
    ex, correct = pick_example(rmt, args.task, args.seed)
    stats, result = analyse(rmt, ex)
    stats.update(
        task=args.task, model=args.model or os.path.join(args.out, "train", "model"), answered_correctly=correct
    )
    with open(os.path.join(args.out, "memory_attention.json"), "w") as f:
        json.dump(stats, f, indent=2)
    plot(os.path.join(args.out, "memory_attention.png"), stats, result, ex)
    print(
        f"fact_share_write {stats['fact_share_write']:.3f} (uniform {stats['uniform_share']:.3f}, "
        f"x{stats['fact_over_uniform']:.1f}), read_share {stats['read_share']:.3f}; wrote "
        f"{os.path.join(args.out, 'memory_attention.png')} and memory_attention.json"
    )
    return stats


if __name__ == "__main__":
    main()

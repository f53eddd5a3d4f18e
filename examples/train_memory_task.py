"""Train an RMT on the paper's synthetic memory tasks (arXiv 2304.11062) and test it on longer inputs.

    python examples/train_memory_task.py --task memorize --out examples/results/memorize

trains a tiny BERT encoder RMT (FastRMT) on the CPU with a curriculum on the number of segments (1, 2, ... up
to the last --curriculum entry: a stage ends when its validation accuracy reaches --advance-acc or after
--steps-per-stage steps), then evaluates on fresh seeded examples at every --eval-segments length, also
longer than any it trained on. It writes DIR/results.json

    {"task": ..., "train_segments": [...], "eval": {"<n_segments>": accuracy, ...}, "chance": ..., ...}

(extra fields: tokens per length, times, the configuration and the curriculum log) and DIR/accuracy.png;
``--save-model`` also saves the trained RMT to DIR/model (``FastRMT.from_pretrained`` loads it).
``--decoder`` trains a tiny GPT-2 decoder RMT instead (the answer word is predicted after the question).

The defaults are the tuned CPU setting (2-layer hidden-128 BERT, 24 tokens per segment, 4 memory tokens,
curriculum 1,2,3,4 then a mixed-length phase until --time-budget, memory noise 0.5 while training).

The paper-sized run (bert-base shape from ``BertConfig()``, random init, no time limit, on a GPU; memory noise
off as in the paper):

    python examples/train_memory_task.py --task memorize --model bert-base --device cuda \
        --segment-size 499 --num-mem-tokens 10 --curriculum 1,2,3,4,5,6,7 --eval-segments 1,2,4,8,16,32 \
        --steps-per-stage 10000 --final-steps 0 --val-every 200 --val-samples 500 --batch-size 32 \
        --lr 1e-4 --memory-noise 0 --time-budget 0 --out runs/memorize-bert-base

(--task detect / reasoning for the other two tasks; --decoder for a GPT-2-small-shaped decoder RMT.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rmt_fast import FastRMT, memory_detached_before  # noqa: E402
from rmt_fast.tasks import (  # noqa: E402
    ANSWER_TOKEN_IDS,
    CHANCE,
    CLS_ID,
    NUM_ANSWERS,
    PAD_ID,
    SEP_ID,
    TASKS,
    VOCAB_SIZE,
    MemoryTaskDataset,
    lm_labels,
    make_batch,
)


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive ints, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="memorize")
    p.add_argument("--out", required=True, help="output folder for results.json and accuracy.png")
    p.add_argument("--decoder", action="store_true", help="a decoder (GPT-2) RMT instead of a BERT encoder RMT")
    p.add_argument(
        "--model",
        choices=("tiny", "bert-base"),
        default="tiny",
        help="tiny: a small random-init model for the CPU; bert-base: BertConfig() (GPT2Config() with "
        "--decoder) shapes, random init, for GPU runs",
    )
    p.add_argument("--segment-size", type=int, default=24, help="content tokens per segment")
    p.add_argument("--num-mem-tokens", type=int, default=4)
    p.add_argument("--curriculum", type=_ints, default=_ints("1,2,3,4"), help="numbers of segments, in order")
    p.add_argument("--eval-segments", type=_ints, default=_ints("1,2,4,8,16,32"))
    p.add_argument("--steps-per-stage", type=int, default=1500, help="most optimizer steps per curriculum stage")
    p.add_argument(
        "--final-steps",
        type=int,
        default=5000,
        help="extra steps after the curriculum on a mixture of all its lengths (0: none)",
    )
    p.add_argument(
        "--final-schedule",
        choices=("cosine", "constant"),
        default="constant",
        help="learning rate over the final mixed phase (cosine: decays to 0 by its last step or by "
        "the end of the time budget, whichever comes first)",
    )
    p.add_argument("--advance-acc", type=float, default=0.98, help="validation accuracy that ends a stage")
    p.add_argument("--val-every", type=int, default=25, help="steps between validation checks")
    p.add_argument("--val-samples", type=int, default=200)
    p.add_argument(
        "--mix-shorter",
        type=float,
        default=0.25,
        help="fraction of batches drawn with fewer segments than the current stage",
    )
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--bptt-depth", type=int, default=-1, help="-1: full backpropagation through time")
    p.add_argument(
        "--memory-noise",
        type=float,
        default=0.5,
        help="std of Gaussian noise added to the memory between segments while training (a regulariser "
        "for length generalisation; 0: one plain FastRMT call per batch)",
    )
    p.add_argument("--layers", type=int, default=2, help="tiny model: layers")
    p.add_argument("--hidden", type=int, default=128, help="tiny model: hidden size")
    p.add_argument("--heads", type=int, default=4, help="tiny model: attention heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=450.0,
        help="seconds of training; past it training stops and evaluation still runs (<= 0: no limit)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument(
        "--save-model",
        action="store_true",
        help="also save the trained RMT to DIR/model (FastRMT.save_pretrained; load it with "
        "FastRMT.from_pretrained, e.g. for examples/memory_attention.py --model DIR/model)",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ model
def build_rmt(args) -> FastRMT:
    import transformers as tf

    m, size = args.num_mem_tokens, args.segment_size
    if args.decoder:
        positions = size + 2 * m
        ids = dict(bos_token_id=PAD_ID, eos_token_id=PAD_ID, pad_token_id=PAD_ID)
        if args.model == "bert-base":
            cfg = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_positions=max(1024, positions), **ids)
        else:
            cfg = tf.GPT2Config(
                vocab_size=VOCAB_SIZE,
                n_positions=positions,
                n_embd=args.hidden,
                n_layer=args.layers,
                n_head=args.heads,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **ids,
            )
        model = tf.GPT2LMHeadModel(cfg)
        return FastRMT(model, m, size, bptt_depth=args.bptt_depth)
    positions = size + m + 3
    if args.model == "bert-base":
        cfg = tf.BertConfig(
            vocab_size=VOCAB_SIZE,
            num_labels=NUM_ANSWERS,
            pad_token_id=PAD_ID,
            max_position_embeddings=max(512, positions),
        )
    else:
        cfg = tf.BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=2 * args.hidden,
            max_position_embeddings=positions,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=NUM_ANSWERS,
            pad_token_id=PAD_ID,
        )
    model = tf.BertForSequenceClassification(cfg)
    return FastRMT(
        model, m, size, bptt_depth=args.bptt_depth, cls_token_id=CLS_ID, sep_token_id=SEP_ID, pad_token_id=PAD_ID
    )


_ANSWER_IDS: dict[str, torch.Tensor] = {}


def loss_and_logits(
    rmt: FastRMT, ids: torch.Tensor, labels: torch.Tensor | None, with_loss: bool = True, memory_noise: float = 0.0
):
    """(loss or None, (B, NUM_ANSWERS) answer scores). Encoder: the classifier on the last segment.
    Decoder: the causal-LM loss on the answer token; scores = the answer words' logits before it.

    ``memory_noise > 0`` runs the segments one call at a time, passing ``memory_state`` on and adding Gaussian
    noise of that std to it between segments (full BPTT through it, or the wrapper's bptt_depth rule)."""
    key = str(ids.device)
    if rmt.is_decoder and key not in _ANSWER_IDS:
        _ANSWER_IDS[key] = torch.tensor(ANSWER_TOKEN_IDS, device=ids.device)

    def call(x, memory_state=None, last=True):
        if rmt.is_decoder:
            return rmt(
                x, labels=lm_labels(x) if with_loss and last else None, memory_state=memory_state, return_logits=last
            )
        return rmt(x, labels=labels if with_loss and last else None, memory_state=memory_state, return_logits=last)

    if memory_noise > 0:
        size = rmt.segment_size
        n = ids.shape[1] // size
        memory = None
        for t in range(n):
            if memory is not None and memory_detached_before(t, n, rmt.settings.bptt_depth):
                memory = memory.detach()
            out = call(ids[:, t * size : (t + 1) * size], memory, last=t == n - 1)
            memory = out.memory_state + memory_noise * torch.randn_like(out.memory_state)
    else:
        out = call(ids)
    scores = out.logits[:, -2, _ANSWER_IDS[key]] if rmt.is_decoder else out.logits
    return out.loss, scores


@torch.no_grad()
def accuracy(rmt, ids: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    was = rmt.training
    rmt.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        _, scores = loss_and_logits(rmt, ids[i : i + batch_size], None, with_loss=False)
        correct += (scores.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    rmt.train(was)
    return correct / len(labels)


def _dataset(args, n: int, n_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = MemoryTaskDataset(args.task, n_samples, n, args.segment_size, seed=seed, decoder=args.decoder)
    return ds.input_ids.to(args.device), ds.labels


# ------------------------------------------------------------------------------------------------ train
def train(args, rmt, log) -> tuple[list[int], list[dict]]:
    device = args.device
    opt = torch.optim.AdamW(rmt.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = random.Random(f"train/{args.task}/{args.seed}")
    start = time.perf_counter()
    budget = args.time_budget if args.time_budget and args.time_budget > 0 else math.inf
    stages_done: list[int] = []
    history: list[dict] = []
    step = 0
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=len(args.curriculum) * args.steps_per_stage + args.final_steps, desc="train", dynamic_ncols=True
        )
    out_of_time = False
    plan = [(n, args.steps_per_stage, False) for n in args.curriculum]
    if args.final_steps > 0:
        plan.append((max(args.curriculum), args.final_steps, True))
    rmt.train()
    for stage_n, max_steps, final in plan:
        stage_start = time.perf_counter()
        val_ids, val_labels = _dataset(args, stage_n, args.val_samples, seed=args.seed + 1_000)
        shorter = sorted({n for n in args.curriculum if n < stage_n})
        ema, steps_run, val_acc = None, 0, float("nan")
        for stage_step in range(1, max_steps + 1):
            if time.perf_counter() - start > budget:
                out_of_time = True
                break
            if final:
                n = rng.choice(sorted(set(args.curriculum)))
            elif shorter and rng.random() < args.mix_shorter:
                n = rng.choice(shorter)
            else:
                n = stage_n
            ids, labels = make_batch(args.task, args.batch_size, n, args.segment_size, rng, decoder=args.decoder)
            loss, _ = loss_and_logits(rmt, ids.to(device), labels.to(device), memory_noise=args.memory_noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rmt.parameters(), 1.0)
            scale = min(1.0, (step + 1) / max(1, args.warmup_steps))
            if final and args.final_schedule == "cosine":
                # cosine to 0 over the final phase: by steps, or by the time left when that ends it first
                done = stage_step / max_steps
                if budget < math.inf:
                    left = budget - (stage_start - start)
                    done = max(done, (time.perf_counter() - stage_start) / max(left, 1e-9))
                scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
            for group in opt.param_groups:
                group["lr"] = args.lr * scale
            opt.step()
            step += 1
            steps_run += 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(seg=stage_n, loss=f"{ema:.3f}", val=f"{val_acc:.2f}")
            if stage_step % args.val_every == 0:
                val_acc = accuracy(rmt, val_ids, val_labels, args.eval_batch_size)
                if not final and val_acc >= args.advance_acc:
                    break
        if steps_run and steps_run % args.val_every:
            val_acc = accuracy(rmt, val_ids, val_labels, args.eval_batch_size)
        entry = dict(
            segments=stage_n,
            final_mix=final,
            steps=steps_run,
            val_acc=val_acc,
            loss_ema=ema,
            elapsed_s=round(time.perf_counter() - start, 1),
        )
        history.append(entry)
        log(f"stage {'mix' if final else stage_n}: {entry}")
        if steps_run and stage_n not in stages_done:
            stages_done.append(stage_n)
        if out_of_time:
            log(f"time budget of {args.time_budget:.0f} s reached during stage {stage_n}")
            break
    if progress is not None:
        progress.close()
    return stages_done, history


def plot(path: str, results: dict, segment_size: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(k) for k in results["eval"])
    acc = [results["eval"][str(n)] for n in ns]
    fig, ax = plt.subplots(figsize=(6, 4))
    if results["train_segments"]:
        lo, hi = min(results["train_segments"]), max(results["train_segments"])
        ax.axvspan(lo, hi, color="tab:green", alpha=0.15, label="trained lengths")
    ax.plot(ns, acc, "o-", label=f"RMT ({results['config']['model']} {results['config']['backbone']})")
    ax.axhline(results["chance"], color="gray", ls="--", label=f"chance ({results['chance']:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([f"{n}\n{n * segment_size}" for n in ns])
    ax.set_xlabel(f"evaluated length: segments / tokens ({segment_size} per segment)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{results['task']}: accuracy vs input length")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    def log(msg: str):
        print(msg, flush=True)

    rmt = build_rmt(args).to(args.device)
    n_params = sum(p.numel() for p in rmt.parameters())
    backbone = type(rmt.model).__name__
    log(
        f"{args.task}: {backbone} ({args.model}, {n_params / 1e6:.2f} M parameters), segment_size="
        f"{args.segment_size}, num_mem_tokens={args.num_mem_tokens}, curriculum={args.curriculum}, "
        f"threads={torch.get_num_threads()}"
    )
    t0 = time.perf_counter()
    stages, history = train(args, rmt, log)
    train_time = time.perf_counter() - t0
    evals = {}
    for n in args.eval_segments:
        ids, labels = _dataset(args, n, args.eval_samples, seed=args.seed + 10_000)
        evals[str(n)] = accuracy(rmt, ids, labels, args.eval_batch_size)
        log(f"eval {n:>3} segments ({n * args.segment_size:>5} tokens): accuracy {evals[str(n)]:.3f}")
    total = time.perf_counter() - t0
    config = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "save_model")}
    config.update(backbone=backbone, parameters=n_params, threads=torch.get_num_threads())
    results = {
        "task": args.task,
        "train_segments": stages,
        "eval": evals,
        "chance": CHANCE,
        "eval_tokens": {str(n): n * args.segment_size for n in args.eval_segments},
        "train_time_s": round(train_time, 1),
        "total_time_s": round(total, 1),
        "config": config,
        "curriculum": history,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(os.path.join(args.out, "accuracy.png"), results, args.segment_size)
    if args.save_model:
        rmt.save_pretrained(os.path.join(args.out, "model"))
        log(f"saved the model to {os.path.join(args.out, 'model')}")
    log(f"wrote {os.path.join(args.out, 'results.json')} and accuracy.png ({total:.0f} s)")
    return results


if __name__ == "__main__":
    main()

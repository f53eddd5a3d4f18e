"""Train a decoder RMT with DistributedDataParallel: the torchrun entry point.

    torchrun --nproc_per_node=2 examples/train_lm_ddp.py --steps 20                  # CPU (gloo)
    torchrun --nproc_per_node=8 examples/train_lm_ddp.py --model gpt2 --segments 16   # GPUs (nccl)

It trains on synthetic token streams (no downloads) and prints the loss on rank 0. Swap in a real model with
``--from-pretrained NAME`` where its weights are available locally.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rmt_fast import FastRMT


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "gpt2"], default="tiny")
    p.add_argument("--from-pretrained", default=None)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--segment-size", type=int, default=128)
    p.add_argument("--num-mem-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2, help="per process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights and memory on every rank
    if args.from_pretrained:
        model = AutoModelForCausalLM.from_pretrained(args.from_pretrained)
    elif args.model == "gpt2":
        model = GPT2LMHeadModel(GPT2Config())
    else:
        tiny = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(tiny)
    rmt = FastRMT(model, args.num_mem_tokens, args.segment_size, gradient_checkpointing=args.gradient_checkpointing).to(
        device
    )
    ddp = DistributedDataParallel(rmt, device_ids=[local_rank] if cuda else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        # A learnable synthetic stream: each row repeats a random pattern, so memory helps predict it.
        pattern = torch.randint(0, vocab, (args.batch_size, args.segment_size), generator=gen)
        ids = pattern.repeat(1, args.segments).to(device)
        loss = ddp(ids, labels=ids, return_logits=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

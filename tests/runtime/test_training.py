"""Training at length: per-segment checkpointing, the streamed loss, DDP on gloo, the HF Trainer, Accelerate."""

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import CLS, SEP, VOCAB, bert_cls, gpt2, llama, pair
from numerics import assert_close

from rmt_fast import FastRMT


def _ids(b, t, seed=21):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _grads(rmt, **inputs):
    rmt.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks in both runs
    out = rmt(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in rmt.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["gpt2_dropout", "llama", "bert"])
def test_gradient_checkpointing_gives_identical_gradients(case):
    torch.manual_seed(0)
    if case == "bert":
        base, kw = bert_cls(), dict(cls_token_id=CLS, sep_token_id=SEP)
        inputs = dict(input_ids=_ids(2, 30), labels=torch.tensor([0, 2]))
    else:
        base = gpt2(resid_pdrop=0.1, attn_pdrop=0.1) if case == "gpt2_dropout" else llama()
        kw, ids = {}, _ids(2, 29)
        inputs = dict(input_ids=ids, labels=ids, return_logits=False)
    plain = FastRMT(copy.deepcopy(base), 3, 6, **kw).train()
    ckpt = FastRMT(copy.deepcopy(base), 3, 6, gradient_checkpointing=True, **kw).train()
    ckpt.load_state_dict(plain.state_dict())
    loss_a, grads_a = _grads(plain, **inputs)
    loss_b, grads_b = _grads(ckpt, **inputs)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], tol=1e-6, name=name)


def _saved_numels(rmt, ids, **kw):
    sizes = []
    params = {p.data_ptr() for p in rmt.parameters()}

    def pack(t):
        if t.data_ptr() not in params:  # activations only, not weights
            sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rmt(ids, labels=ids, return_logits=False, **kw).loss.backward()
    return sizes


def test_streamed_loss_never_materializes_full_logits():
    torch.manual_seed(0)
    rmt = FastRMT(gpt2(), 2, 8)
    ids = _ids(2, 8 * 6)
    b, t = ids.shape
    shapes = _saved_numels(rmt, ids)
    vocab_sized = [torch.Size(s).numel() for s in shapes if s and s[-1] == VOCAB]
    assert vocab_sized and max(vocab_sized) <= b * 8 * VOCAB  # one segment's logits at a time, never (B, T, V)
    assert max(torch.Size(s).numel() for s in shapes) < b * t * VOCAB


def test_checkpointing_keeps_memory_sized_tensors_only():
    torch.manual_seed(0)
    short, long = _ids(2, 8 * 2), _ids(2, 8 * 8)
    rmt = FastRMT(gpt2(), 2, 8, gradient_checkpointing=True)
    total = lambda shapes: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    grow_ckpt = total(_saved_numels(rmt, long)) - total(_saved_numels(rmt, short))
    plain = FastRMT(gpt2(), 2, 8)
    grow_plain = total(_saved_numels(plain, long)) - total(_saved_numels(plain, short))
    assert grow_ckpt < grow_plain / 10


def test_streamed_loss_matches_reference_with_checkpointing():
    ref, fast = pair(llama, 2, 5)
    fast.gradient_checkpointing = True
    ids = _ids(2, 23)
    a, b = ref(ids, labels=ids), fast(ids, labels=ids, return_logits=False)
    assert_close(b.loss, a.loss, tol=1e-6, name="loss")  # ~log(96): tighter than the old 1e-5 absolute


# ----------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, state, ids, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rmt = FastRMT(gpt2(), 2, 6)
    rmt.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(rmt)
    shard = ids.chunk(world)[rank]
    ddp(shard, labels=shard).loss.backward()
    _finish(rank, result_dir, {n: p.grad for n, p in rmt.named_parameters()})


def _finish(rank, result_dir, grads):
    if rank == 0:
        torch.save(grads, os.path.join(result_dir, "grads.pt"))
    dist.barrier()
    # Leave without running the gloo process group's and DDP reducer's destructors: at teardown they can
    # deadlock on the GIL (a gloo worker thread freeing a finished work item while the main thread joins it).
    os._exit(0)


def _fsdp_worker(rank, world, port, state, ids, result_dir):
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rmt = FastRMT(gpt2(), 2, 6)
    rmt.load_state_dict(state)
    for block in rmt.model.transformer.h:
        fully_shard(block)
    fully_shard(rmt)
    shard = ids.chunk(world)[rank]
    rmt(shard, labels=shard).loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in rmt.named_parameters()}  # a collective: every rank
    _finish(rank, result_dir, grads)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("worker", [_ddp_worker, _fsdp_worker], ids=["ddp", "fsdp2"])
def test_distributed_gloo_two_processes_match_single_process(tmp_path, worker):
    torch.manual_seed(0)
    rmt = FastRMT(gpt2(), 2, 6)
    ids = _ids(4, 20)
    rmt(ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in rmt.named_parameters()}
    ctx = mp.start_processes(
        worker, args=(2, _free_port(), rmt.state_dict(), ids, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("distributed workers did not finish within 240 s")
    got = torch.load(tmp_path / "grads.pt")
    for name, grad in expected.items():
        assert_close(got[name], grad, dtype=torch.float32, name=name)


# ------------------------------------------------------------------------------------- HF Trainer, Accelerate
class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_trains_fastrmt(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    rmt = FastRMT(gpt2(), 2, 6)
    before = rmt.memory.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=rmt, args=args, train_dataset=_Rows(_ids(6, 20)))
    result = trainer.train()
    assert result.global_step == 3 and result.training_loss > 0
    assert not torch.equal(rmt.memory.detach(), before)  # the memory parameter was trained


def test_accelerate_trains_fastrmt():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True)
    rmt = FastRMT(gpt2(), 2, 6)
    opt = torch.optim.AdamW(rmt.parameters(), lr=1e-2)
    rmt, opt = accelerator.prepare(rmt, opt)
    ids = _ids(2, 20)
    losses = []
    for _ in range(3):
        loss = rmt(ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

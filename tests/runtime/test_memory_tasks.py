"""The synthetic memory tasks (rmt_fast.tasks) and a smoke run of examples/train_memory_task.py."""

import importlib.util
import json
import os
import random

import pytest
import torch

from rmt_fast.tasks import memory_tasks as mt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 24


def _examples(task, n, count=40, seed=0, decoder=False):
    rng = random.Random(seed)
    return [mt.make_example(task, n, SIZE, rng, decoder=decoder, return_example=True) for _ in range(count)]


def test_vocabulary_specials_and_roundtrip():
    assert (mt.PAD_ID, mt.CLS_ID, mt.SEP_ID) == (0, 1, 2)
    assert len(set(mt.VOCAB)) == len(mt.VOCAB) == mt.VOCAB_SIZE
    text = "Mary went to the kitchen. Where is Mary?"
    assert mt.decode(mt.encode(text)) == "mary went to the kitchen . where is mary ?"
    assert not set(mt.DISTRACTOR_WORDS) & set(mt.FACT_CONTENT_WORDS)
    with pytest.raises(KeyError):
        mt.encode("mary went to the moon")
    assert mt.CHANCE == pytest.approx(1 / len(mt.PLACES))


@pytest.mark.parametrize("task", mt.TASKS)
def test_seeded_and_deterministic(task):
    a = mt.MemoryTaskDataset(task, 16, 3, SIZE, seed=5)
    b = mt.MemoryTaskDataset(task, 16, 3, SIZE, seed=5)
    c = mt.MemoryTaskDataset(task, 16, 3, SIZE, seed=6)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)
    x = mt.make_batch(task, 4, 2, SIZE, random.Random(1))
    y = mt.make_batch(task, 4, 2, SIZE, random.Random(1))
    assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("task", mt.TASKS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_structure(task, n, decoder):
    total = n * SIZE
    last = (n - 1) * SIZE  # the last segment's first token
    places = {mt.WORD_TO_ID[p] for p in mt.PLACES}
    content = {mt.WORD_TO_ID[w] for w in mt.FACT_CONTENT_WORDS}
    for ex in _examples(task, n, decoder=decoder):
        ids = ex.input_ids
        assert len(ids) == total
        assert all(3 <= i < mt.VOCAB_SIZE for i in ids)  # no pad/cls/sep: the wrapper adds them
        assert 0 <= ex.label < mt.NUM_ANSWERS and mt.PLACES[ex.label] == ex.answer
        q0, q1 = ex.question_span
        assert q0 >= last and q1 == total - (1 if decoder else 0)  # the question ends the (last) segment
        assert mt.decode(ids[q0:q1]).startswith("where is")
        if decoder:
            assert ids[-1] == mt.WORD_TO_ID[ex.answer]
        # the facts are the only place any fact content occurs (filler never carries any)
        in_facts = set()
        for s, e in ex.fact_spans:
            in_facts.update(range(s, e))
            assert ids[e - 1] == mt.WORD_TO_ID["."]
        for i, tok in enumerate(ids[:q0]):
            if i not in in_facts:
                assert tok not in content, (i, mt.decode(ids))
        # placement: before the last segment (n >= 2) or before the question (n == 1)
        limit = last if n >= 2 else q0
        assert all(e <= limit for _, e in ex.fact_spans)
        if n >= 2:
            body = ids[last:-1] if decoder else ids[last:]
            assert not places & set(body), "the answer must not be readable from the last segment"
        if task == "memorize":
            assert ex.fact_spans == [(0, 6)] and mt.decode(ids[:6]).split()[0] in mt.PEOPLE
        if task in ("memorize", "detect"):
            ((s, e),) = ex.fact_spans
            fact = mt.decode(ids[s:e]).split()
            assert fact[-2] == ex.answer and ids[q0 + 2] == mt.WORD_TO_ID[fact[0]]
        if task == "reasoning":
            assert len(ex.fact_spans) == 3
            facts = [mt.decode(ids[s:e]).split() for s, e in ex.fact_spans]
            obj = mt.VOCAB[ids[q0 + 3]]
            holder = next(f[0] for f in facts if f[-2] == obj)
            moves = [f for f in facts if f[-2] in mt.PLACES]
            assert len(moves) == 2 and moves[0][-2] != moves[1][-2]
            assert next(f[-2] for f in moves if f[0] == holder) == ex.answer


def test_detect_positions_vary_and_reach_late_segments():
    starts = [ex.fact_spans[0][0] for ex in _examples("detect", 4, count=200)]
    assert min(starts) < SIZE and max(starts) >= 2 * SIZE and len(set(starts)) > 20


def test_too_small_segments_raise():
    with pytest.raises(ValueError, match="segment_size"):
        mt.make_example("reasoning", 2, 8, random.Random(0))
    with pytest.raises(ValueError, match="task"):
        mt.make_example("nope", 2, 8, random.Random(0))


def _script():
    spec = importlib.util.spec_from_file_location(
        "train_memory_task", os.path.join(ROOT, "examples", "train_memory_task.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("decoder", [False, True])
def test_training_script_smoke(tmp_path, decoder):
    script = _script()
    out = tmp_path / ("dec" if decoder else "enc")
    argv = [
        "--task",
        "memorize",
        "--out",
        str(out),
        "--curriculum",
        "1,2",
        "--eval-segments",
        "1,3",
        "--steps-per-stage",
        "2",
        "--final-steps",
        "2",
        "--val-every",
        "2",
        "--val-samples",
        "8",
        "--eval-samples",
        "8",
        "--batch-size",
        "4",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--segment-size",
        "16",
        "--no-progress",
        "--save-model",
    ]
    if decoder:  # the decoder and the single-call path (no memory noise); the encoder runs segment by segment
        argv += ["--decoder", "--memory-noise", "0"]
    results = script.main(argv)
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    assert {"task", "train_segments", "eval", "chance"} <= set(saved)
    assert saved["task"] == "memorize" and saved["train_segments"] == [1, 2]
    assert set(saved["eval"]) == {"1", "3"} and all(0.0 <= v <= 1.0 for v in saved["eval"].values())
    assert saved["chance"] == pytest.approx(1 / len(mt.PLACES))
    assert (out / "accuracy.png").stat().st_size > 0
    # --save-model: the saved RMT reloads and scores what the run scored on the same evaluation set
    from rmt_fast import FastRMT

    loaded = FastRMT.from_pretrained(out / "model")
    args = script.parse_args(argv)
    ids, labels = script._dataset(args, 3, args.eval_samples, seed=args.seed + 10_000)
    assert script.accuracy(loaded, ids, labels, args.eval_batch_size) == saved["eval"]["3"]
    assert loaded.is_decoder == decoder and "save_model" not in saved["config"]

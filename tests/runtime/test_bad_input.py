"""Bad values in the inputs (issue 12): out-of-vocabulary ids, labels outside their classes, masks that are not
0/1, an empty batch, a non-finite memory_state. Each is a ValueError naming the argument, the value and where
it sits, raised before anything runs on the device (the backbone's embedding is never called) and leaving the
model unchanged; the checks cost one host synchronisation per call, and ``check_inputs=False`` skips them."""

import copy

import pytest
import torch
import transformers as tf
from bad_inputs import DECODER_CASES, _expect_error, _ids, _with
from models import CLS, PAD, SEP, VOCAB, _bert_cfg, bert_bare, bert_cls, bert_mlm, gpt2
from numerics import TOL, assert_close

import rmt_fast.base
from rmt_fast import FastRMT, ReferenceRMT

WRAPPERS = [FastRMT, ReferenceRMT]
ENC = dict(cls_token_id=CLS, sep_token_id=SEP)


@pytest.fixture(params=WRAPPERS, ids=lambda c: c.__name__)
def decoder(request):
    torch.manual_seed(0)
    return request.param(gpt2(), 2, 6)


@pytest.fixture(params=WRAPPERS, ids=lambda c: c.__name__)
def encoder(request):
    torch.manual_seed(0)
    return request.param(bert_cls(), 2, 5, **ENC)


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_forward_rejects(decoder, case):
    inputs, match = DECODER_CASES[case]
    _expect_error(decoder, lambda: decoder(**inputs), match)


@pytest.mark.parametrize(
    "case",
    ["id >= vocab", "negative id", "batch size 0", "attention_mask 2s", "attention_mask 0.5", "memory_state nan"],
)
def test_decoder_generate_rejects(decoder, case):
    inputs, match = DECODER_CASES[case]
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    _expect_error(decoder, lambda: decoder.generate(**inputs, **kw), match)


def test_first_offender_is_reported(decoder):
    ids = _with(_with(_with(_ids(), (1, 2), 100), (0, 9), 101), (1, 0), -1)  # row 0 comes first
    with pytest.raises(ValueError, match=r"holds 101 at row 0, position 9"):
        decoder(ids)
    labels = _with(_with(_ids(), (0, 0), -100), (1, 1), 96)
    with pytest.raises(ValueError, match=r"input_ids holds 101"):  # arguments in order: input_ids first
        decoder(ids, labels=labels)


def test_decoder_accepts_edge_values(decoder):
    ids = _with(_with(_ids(), (0, 0), 0), (1, 11), VOCAB - 1)
    labels = _with(_with(ids, (0, 0), -100), (1, 5), -100)
    ref = decoder(ids, attention_mask=torch.ones_like(ids), labels=labels)
    for mask in (torch.ones(2, 12, dtype=torch.bool), torch.ones(2, 12), torch.ones(2, 12, dtype=torch.int32)):
        out = decoder(ids, attention_mask=mask, labels=labels, labels_mask=mask)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    mask = _with(torch.ones_like(ids), (1, 3), 0)
    assert torch.equal(decoder(ids, attention_mask=mask).logits, decoder(ids, attention_mask=mask.bool()).logits)


# -------------------------------------------------------------------------------------------- encoders
def test_encoder_rejects_out_of_vocabulary_ids(encoder):
    ids = _ids(t=8)
    _expect_error(encoder, lambda: encoder(_with(ids, (1, 3), VOCAB)), rf"input_ids holds {VOCAB} at row 1, position 3")
    _expect_error(encoder, lambda: encoder(_with(ids, (0, 0), -1)), r"input_ids holds -1 at row 0, position 0")
    _expect_error(encoder, lambda: encoder(ids[:0]), "batch size 0")


@pytest.mark.parametrize("cls", WRAPPERS)
def test_encoder_special_ids_are_dropped_not_errors(cls):
    """pad, CLS and SEP in input_ids are removed by value (as the reference does): no error, same result."""
    torch.manual_seed(0)
    rmt = cls(bert_cls(), 2, 5, **ENC)
    content = _ids(1, 9)
    noisy = torch.cat(
        [content[:, :2], torch.tensor([[PAD, CLS]]), content[:, 2:7], torch.tensor([[SEP, PAD]]), content[:, 7:]], dim=1
    )
    a, b = rmt(content), rmt(noisy)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.memory_state, b.memory_state)


@pytest.mark.parametrize("cls", WRAPPERS)
@pytest.mark.parametrize("name", ["cls_token_id", "sep_token_id", "pad_token_id"])
@pytest.mark.parametrize("value", [VOCAB, -1])
def test_encoder_special_ids_must_be_in_the_vocabulary(cls, name, value):
    model = bert_cls()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"{name} must be an id in the model's vocabulary \[0, {VOCAB}\)"):
        cls(model, 2, 5, **{**ENC, name: value})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_encoder_classification_labels(encoder):
    ids = _ids(t=8)
    _expect_error(
        encoder,
        lambda: encoder(ids, labels=torch.tensor([0, 3])),
        r"labels holds 3 at row 1: expected class ids in \[0, 3\) \(num_labels\)",
    )
    _expect_error(encoder, lambda: encoder(ids, labels=torch.tensor([-1, 0])), r"labels holds -1 at row 0")
    _expect_error(
        encoder,
        lambda: encoder(ids, labels=torch.tensor([0, 1], dtype=torch.int32)),
        "labels must be an int64 tensor of class ids",
    )
    assert torch.isfinite(encoder(ids, labels=torch.tensor([2, -100])).loss)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_encoder_float_targets_are_not_ids(cls):
    """Regression and multi-label targets are not class ids: no range check."""
    ids = _ids(t=8)
    reg = cls(tf.BertForSequenceClassification(_bert_cfg(num_labels=1)), 2, 5, **ENC)
    assert torch.isfinite(reg(ids, labels=torch.tensor([7.5, -3.0])).loss)
    multi = cls(bert_cls(problem_type="multi_label_classification"), 2, 5, **ENC)
    assert torch.isfinite(multi(ids, labels=torch.tensor([[0.3, 1.0, 0.0], [1.0, 0.0, 0.7]])).loss)


@pytest.mark.parametrize("cls", WRAPPERS)
def test_encoder_token_labels(cls):
    torch.manual_seed(0)
    rmt = cls(bert_mlm(), 2, 5, **ENC)
    ids = _ids(t=8)
    labels = torch.full((2, 8), -100)
    labels[0, 6] = VOCAB - 1  # in the last segment, whose loss is the output
    assert torch.isfinite(rmt(ids, labels=labels).loss)
    match = rf"labels holds {VOCAB} at row 1, position 4: expected class ids in \[0, {VOCAB}\) \(the vocabulary\)"
    _expect_error(rmt, lambda: rmt(ids, labels=_with(labels, (1, 4), VOCAB)), match)


def test_encoder_masks_and_memory(encoder):
    ids = _with(_ids(t=8), (1, 7), PAD)
    mask = (ids != PAD).long()
    encoder(ids, attention_mask=mask)
    _expect_error(
        encoder,
        lambda: encoder(ids, attention_mask=_with(mask, (0, 1), 2)),
        r"attention_mask holds 2 at row 0, position 1",
    )
    _expect_error(
        encoder,
        lambda: encoder(ids, attention_mask=_with(mask, (0, 1), 0)),
        r"attention_mask masks non-pad tokens \(row 0, position 1",
    )
    memory = _with(torch.zeros(2, 2, 32), (0, 1, 0), float("inf"))
    _expect_error(encoder, lambda: encoder(ids, memory_state=memory), r"memory_state holds inf at row 0, memory slot 1")


# ------------------------------------------------------------------------------------ check_inputs=False
@pytest.mark.parametrize("cls", WRAPPERS)
def test_check_inputs_false_skips_value_checks(cls):
    torch.manual_seed(0)
    rmt = cls(gpt2(), 2, 6, check_inputs=False)
    ids = _ids()
    rmt(ids, attention_mask=torch.full_like(ids, 2))  # runs unchecked, as before issue 12
    # NaN memory with the checks off: documented propagation. The NaN row's memory, and so every later
    # segment and call, is NaN; the other row is untouched by it.
    memory = _with(rmt.memory.detach().expand(2, -1, -1).clone(), (1, 0, 5), float("nan"))
    out = rmt(ids, memory_state=memory)
    assert out.memory_state[1].isnan().all() and out.logits[1].isnan().all()
    clean = rmt(ids)
    assert torch.equal(out.memory_state[0], clean.memory_state[0])
    # shape, dtype and device checks still run, and so does the encoder's hidden-content check
    with pytest.raises(ValueError, match="batch size 0"):
        rmt(ids[:0])
    enc = cls(bert_cls(), 2, 5, check_inputs=False, **ENC)
    ids = _ids(t=8)
    with pytest.raises(ValueError, match="attention_mask masks non-pad tokens"):
        enc(ids, attention_mask=_with(torch.ones_like(ids), (1, 2), 0))


@pytest.mark.parametrize("cls", WRAPPERS)
def test_check_inputs_option(cls, tmp_path):
    with pytest.raises(ValueError, match="check_inputs must be True or False"):
        cls(gpt2(), 2, 6, check_inputs="no")
    assert cls(gpt2(), 2, 6).settings.check_inputs is True
    rmt = cls(gpt2(), 2, 6, check_inputs=False)
    rmt.save_pretrained(tmp_path)
    assert cls.from_pretrained(tmp_path).settings.check_inputs is False


# ----------------------------------------------------------------------------------------- one host sync
class _SyncCounter:
    """Counts the Tensor methods that read a device value to the host (a sync on CUDA)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        def wrapper(t, *args, **kwargs):
            self.count += 1
            return original(t, *args, **kwargs)

        return wrapper


@pytest.mark.parametrize("cls", WRAPPERS)
@pytest.mark.parametrize("length", [6, 60])
def test_checks_read_the_device_once_per_call(cls, length, monkeypatch):
    """All value checks of a call (ids, mask, labels, labels_mask, memory) share one host read, whatever the
    number of segments; and forward / generate run the checks once per call, not once per segment."""
    torch.manual_seed(0)
    rmt = cls(gpt2(), 2, 6)
    ids = _ids(2, length)
    mask = torch.ones_like(ids)
    memory = rmt.memory.detach().expand(2, -1, -1).clone()
    counter = _SyncCounter(monkeypatch)
    rmt._check_inputs(ids, mask, ids, mask, memory)
    assert counter.count == 1
    monkeypatch.undo()

    calls = []
    original = rmt_fast.base.check_values
    monkeypatch.setattr(rmt_fast.base, "check_values", lambda *a, **k: (calls.append(1), original(*a, **k)))
    rmt(ids, attention_mask=mask, labels=ids, memory_state=memory)
    rmt.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert len(calls) == 2


def test_encoder_checks_read_the_device_once(monkeypatch):
    rmt = FastRMT(bert_mlm(), 2, 5, **ENC)
    ids = _with(_ids(t=40), (1, 39), PAD)
    labels = _with(torch.full((2, 40), -100), (0, 3), 7)
    counter = _SyncCounter(monkeypatch)
    rmt._check_inputs(ids, (ids != PAD).long(), labels, None, None)
    assert counter.count == 1  # ids, mask values and the hidden-content check together


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("cls", WRAPPERS)
def test_cuda_context_survives_rejected_batch(cls):
    """On CUDA an out-of-range id would fire a device-side assert and poison the context; the check refuses
    the batch first, and the same process then runs a good batch."""
    torch.manual_seed(0)
    rmt = cls(gpt2(), 2, 6)
    cpu_ids = _ids()
    with torch.no_grad():
        cpu_loss = rmt(cpu_ids, labels=cpu_ids).loss.item()
    rmt = rmt.cuda()
    ids = cpu_ids.cuda()
    for bad in (
        dict(input_ids=_with(ids, (1, 5), 120)),
        dict(input_ids=_with(ids, (0, 0), -5)),
        dict(input_ids=ids, labels=_with(ids, (0, 3), 120)),
    ):
        with pytest.raises(ValueError, match=r"holds (120|-5) at row"):
            rmt(**bad)
    out = rmt(ids, labels=ids)
    out.loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(out.logits).all()
    # CUDA against CPU kernels (other reductions, TF32 where enabled): ten times the fp32 bound, as before
    assert_close(out.loss.item(), cpu_loss, tol=10 * TOL[torch.float32], floor=1.0, name="CUDA loss")


class _GuardedReads:
    """Counts host reads without trusting how a backend counts synchronisations: every Tensor method that reads a
    value to the host is counted, and on CUDA any OTHER synchronising operation raises (sync debug mode "error",
    lifted only inside a counted read). So "count == 1" means: exactly one read, and no sync besides it, however
    many internal syncs one read makes on a given torch build."""

    NAMES = _SyncCounter.NAMES

    def __init__(self, monkeypatch):
        self.count = 0
        self._monkeypatch = monkeypatch
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, original):
        def wrapper(t, *args, **kwargs):
            self.count += 1
            mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
            if mode:
                torch.cuda.set_sync_debug_mode(0)
            try:
                return original(t, *args, **kwargs)
            finally:
                if mode:
                    torch.cuda.set_sync_debug_mode(mode)

        return wrapper

    def __call__(self, fn) -> int:
        self.count = 0
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        return self.count


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_guarded_reads_count_reads_and_refuse_other_syncs(device, monkeypatch):
    """The counter itself: k reads count k; on CUDA an uncounted synchronising op (nonzero) raises."""
    x = torch.arange(6, device=device)
    guard = _GuardedReads(monkeypatch)
    assert guard(lambda: None) == 0
    assert guard(lambda: x.sum().item()) == 1
    assert guard(lambda: (x.tolist(), x[0].item(), bool(x.any()))) == 3
    if device == "cuda":
        with pytest.raises(RuntimeError, match="synchroniz"):
            guard(lambda: x.nonzero())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [6, 96])
def test_one_host_read_per_check(device, length, monkeypatch):
    """The promise: one host read per input check, whatever the number of segments; on CUDA, no other sync."""
    torch.manual_seed(0)
    rmt = FastRMT(gpt2(), 2, 6).to(device)
    ids = _ids(2, length).to(device)
    mask = torch.ones_like(ids)
    memory = rmt.memory.detach().expand(2, -1, -1).clone()
    rmt._check_inputs(ids, mask, ids, mask, memory)  # warm-up (lazy CUDA initialisation syncs outside the count)
    guard = _GuardedReads(monkeypatch)
    assert guard(lambda: rmt._check_inputs(ids, mask, ids, mask, memory)) == 1


@pytest.mark.parametrize("cls", WRAPPERS)
def test_bare_encoder_takes_no_labels(cls):
    rmt = cls(bert_bare(), 2, 5, **ENC)
    for labels in (torch.tensor([0, 1]), torch.zeros(2, 8, dtype=torch.long)):
        _expect_error(rmt, lambda labels=labels: rmt(_ids(t=8), labels=labels), "BertModel has no head that takes")


def test_benchmark_measures_one_read_per_call():
    from rmt_fast.bench.input_checks import measure

    torch.manual_seed(0)
    rmt = FastRMT(gpt2(), 2, 6).eval()
    row = measure(rmt, 2, 24, dict(vocab=VOCAB, segment_size=6, check_reps=2, forward_reps=1), "cpu")
    assert row["host_reads_per_call"] == 1 and row["segments"] == 4
    assert row["check_on_us"] > 0 and row["forward_ms"] > 0 and rmt.settings.check_inputs is True

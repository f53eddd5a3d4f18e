"""The measured dispatch table (rmt_fast.kernels.dispatch) and how attn_backend='auto' uses it.

On the CPU, 'auto' never runs Triton; the tests that follow the table's Triton answer pretend the inputs are on
CUDA (the one check patched) and run the kernel in Triton's interpreter."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers as tf
from models import VOCAB
from numerics import TOL, assert_close

from rmt_fast import FastRMT
from rmt_fast import attention as seam
from rmt_fast.kernels import dispatch, launch_configs
from rmt_fast.kernels.layout import SegmentLayout

HAS_KERNEL = (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") and seam._triton() is not None
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="needs triton (CUDA or TRITON_INTERPRET=1)")


def _entry(
    dtype="float16",
    head_dim=64,
    t="T<=768",
    bh="BH<=192",
    causal=True,
    padded=False,
    needs_grad=False,
    mode="eager",
    backend="triton",
    **extra,
):
    return dict(
        dtype=dtype,
        head_dim=head_dim,
        t_bucket=t,
        bh_bucket=bh,
        causal=causal,
        padded=padded,
        needs_grad=needs_grad,
        mode=mode,
        backend=backend,
        triton_ms=0.1,
        sdpa_ms=0.2,
        **extra,
    )


def _table(entries, configs=(), arch="sm90", measured=True):
    return dict(
        format=dispatch.FORMAT,
        arch=arch,
        measured=measured,
        devices=["fake"],
        margin=0.03,
        provenance={"tool": "tests"},
        configs=list(configs),
        entries=list(entries),
    )


pytestmark = pytest.mark.usefixtures("clean_dispatch_state")  # tests/kernels/conftest.py


# ------------------------------------------------------------------------------------------------ buckets
def test_buckets():
    assert [dispatch.t_bucket(t) for t in (16, 532, 768, 769, 1044, 2068, 3072, 4096, 10**6)] == [
        "T<=768",
        "T<=768",
        "T<=768",
        "T<=1536",
        "T<=1536",
        "T<=3072",
        "T<=3072",
        "T>3072",
        "T>3072",
    ]
    assert [dispatch.bh_bucket(b * 12) for b in (1, 2, 4, 6, 8, 16, 32)] == [
        "BH<=24",
        "BH<=24",
        "BH<=72",
        "BH<=72",
        "BH<=192",
        "BH<=192",
        "BH>192",
    ]
    assert dispatch.T_BUCKETS == ("T<=768", "T<=1536", "T<=3072", "T>3072")
    cls = dispatch.ShapeClass.of(1, 532, 96, True, False)
    assert cls.decode and cls.t == "T<=768" and "decode" in cls.describe()


# ------------------------------------------------------------------------------------------------- lookup
def test_lookup_against_a_fake_table():
    configs = [dict(dtype="float16", head_dim=64, fwd=[128, 64, 4, 3], dq=[64, 32, 4, 2], dkdv=[32, 128, 8, 2])]
    table = dispatch.DispatchTable(
        _table(
            [
                _entry(),  # inference, eager: triton
                _entry(mode="graphed", backend="sdpa"),
                _entry(needs_grad=True, backend="sdpa"),
                _entry(padded=True, bh="BH>192"),
            ],
            configs,
        )
    )
    cls = dispatch.ShapeClass.of(532, 532, 8 * 12, True, False)
    d = table.lookup(torch.float16, 64, cls, needs_grad=False, graphed=False)
    assert d.backend == "triton" and d.configs["fwd"] == (128, 64, 4, 3) and "triton measured fastest" in d.reason
    assert table.lookup(torch.float16, 64, cls, needs_grad=False, graphed=True).backend == "sdpa"
    assert table.lookup(torch.float16, 64, cls, needs_grad=True, graphed=False).backend == "sdpa"
    big = dispatch.ShapeClass.of(532, 532, 32 * 12, True, True)
    assert table.lookup("float16", 64, big, False, False).backend == "triton"
    # anything not measured is SDPA, with the case named
    unmeasured = [
        (torch.bfloat16, 64, cls),
        (torch.float16, 128, cls),
        (torch.float16, 64, dispatch.ShapeClass(big.t, big.bh, False, True)),  # bidirectional
        (torch.float16, 64, dispatch.ShapeClass.of(1, 532, 96, True, False)),  # decode
        (torch.float16, 64, dispatch.ShapeClass.of(4096, 4096, 96, True, False)),
    ]
    for dtype, d_head, c in unmeasured:
        d = table.lookup(dtype, d_head, c, False, False)
        assert d.backend == "sdpa" and d.configs is None and d.reason.startswith("no measured entry"), d
    assert table.launch_configs()[("dq", 64, torch.float16)] == (64, 32, 4, 2)


def test_choose_rule_needs_a_margin():
    assert dispatch.choose({"triton": 0.9, "sdpa": 1.0}, margin=0.03) == "triton"
    assert dispatch.choose({"triton": 0.98, "sdpa": 1.0}, margin=0.03) == "sdpa"
    assert dispatch.choose({"triton": None, "sdpa": 1.0}) == "sdpa"
    assert dispatch.choose({"triton": 0.5, "sdpa": float("nan")}) == "sdpa"
    assert dispatch.choose({"triton": 0.5, "sdpa_cudnn": 0.4}) == "sdpa"  # no SDPA number: nothing to beat


def test_choose_races_every_backend():
    times = {"triton": 0.9, "sdpa": 1.0, "sdpa_flash": 0.95, "sdpa_cudnn": 0.7, "sdpa_efficient": None, "flex": 0.8}
    assert dispatch.choose(times) == "sdpa_cudnn"
    assert dispatch.choose({**times, "sdpa_cudnn": float("inf")}) == "flex"
    close = {**times, "sdpa_cudnn": 0.99, "flex": 0.985, "triton": None, "sdpa_flash": 2.0}
    assert dispatch.choose(close) == "sdpa"  # within the margin
    assert dispatch.choose({"sdpa": 1.0, "sdpa_efficient": 0.5, "flex": 0.5}) == "sdpa_efficient"  # tie: table order
    with pytest.raises(ValueError, match="unknown backend 'xformers'"):
        dispatch.choose({"sdpa": 1.0, "xformers": 0.5})


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.update(format="other/1"), "format must be"),
        (lambda t: t.pop("arch"), "lacks the field 'arch'"),
        (lambda t: t.update(measured="yes"), "measured must be bool"),
        (lambda t: t.update(margin=1.5), "margin"),
        (lambda t: t["entries"][0].update(t_bucket="T<=500"), "t_bucket must be one of"),
        (lambda t: t["entries"][0].update(mode="compiled"), "mode must be one of"),
        (lambda t: t["entries"][0].update(backend="xformers"), "backend must be one of"),
        (lambda t: t["entries"][0].update(backend="sdpa_"), "backend must be one of"),
        (
            lambda t: t.update(format="rmt-fast-dispatch/1") or t["entries"][0].update(backend="sdpa_cudnn"),
            r"backend must be one of \('triton', 'sdpa'\) in rmt-fast-dispatch/1",
        ),
        (lambda t: t["entries"][0].update(ms={"triton": 0.1, "cudnn": 0.2}), r"ms names the backend 'cudnn'"),
        (lambda t: t["entries"][0].update(ms={"sdpa_flash": "fast"}), r"ms.sdpa_flash must be a number"),
        (lambda t: t["entries"][0].update(ms=[0.1]), r"entries\[0\].ms must be an object"),
        (lambda t: t["entries"][0].update(head_dim="64"), "head_dim must be int"),
        (lambda t: t["entries"].append(copy.deepcopy(t["entries"][0])), "repeats the case"),
        (lambda t: t["configs"].append(dict(dtype="float16", head_dim=64, fwd=[100, 64, 4, 3])), "powers of two"),
        (lambda t: t["configs"].append(dict(dtype="float16", head_dim=64, dq=[64, 64, 4])), r"\[BLOCK_M"),
    ],
)
def test_bad_tables_are_refused_with_the_field_named(mutate, match):
    data = _table([_entry()])
    mutate(data)
    with pytest.raises(ValueError, match=match):
        dispatch.DispatchTable(data)


def test_load_table_file_and_bad_json(tmp_path):
    path = tmp_path / "sm90.json"
    path.write_text(json.dumps(_table([_entry()])))
    assert dispatch.load_table(path).arch == "sm90"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dispatch.load_table(path)


def _check_committable(path):
    """What a table must be to live in kernels/tuned/: valid, measured, named after its architecture, with
    the commit and the devices it was measured on."""
    table = dispatch.load_table(path)
    assert table.measured and table.arch == path.stem, path
    assert table.provenance.get("git_sha") and table.devices, f"{path}: provenance missing"


@pytest.mark.parametrize("path", sorted(dispatch.TUNED_DIR.glob("*.json")) or [None], ids=str)
def test_the_committed_tables_are_valid_and_measured(path):
    if path is None:
        pytest.skip(f"no dispatch table is committed in {dispatch.TUNED_DIR} (auto means SDPA everywhere)")
    _check_committable(path)


def test_the_committed_table_check_accepts_a_good_table_and_refuses_bad_ones(tmp_path):
    good = _table([_entry()])
    good["provenance"] = {"tool": "tests", "git_sha": "0123abc"}
    (tmp_path / "sm90.json").write_text(json.dumps(good))
    _check_committable(tmp_path / "sm90.json")
    for name, change in (
        ("sm90", dict(measured=False)),
        ("sm80", {}),
        ("sm90", dict(provenance={})),
        ("sm90", dict(devices=[])),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(AssertionError):
            _check_committable(tmp_path / f"{name}.json")


def test_read_for_arch_skips_unmeasured_and_foreign_tables(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    monkeypatch.setenv(dispatch.ENV_TABLE, str(path))
    path.write_text(json.dumps(_table([_entry()], measured=False)))
    with pytest.warns(RuntimeWarning, match="unmeasured example"):
        assert dispatch._read_for_arch("sm90") is None
    path.write_text(json.dumps(_table([_entry()], arch="sm80")))
    with pytest.warns(RuntimeWarning, match="is for sm80"):
        assert dispatch._read_for_arch("sm90") is None
    path.write_text(json.dumps(_table([_entry()])))
    assert dispatch._read_for_arch("sm90").entries
    monkeypatch.setenv(dispatch.ENV_TABLE, str(tmp_path / "missing.json"))
    with pytest.warns(RuntimeWarning, match="is not a file"):
        assert dispatch._read_for_arch("sm90") is None


# ----------------------------------------------------------------------------------------- choose_backend
def _qkv(b=2, h=4, t=10, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype) for _ in range(3)]


def _small_entries(**kw):
    base = dict(dtype="float32", head_dim=16, t="T<=768", bh="BH<=24")
    return [
        _entry(**{**base, "causal": c, "padded": p, "needs_grad": g, **kw})
        for c in (True, False)
        for p in (True, False)
        for g in (True, False)
    ]


def test_auto_on_cpu_is_sdpa_whatever_the_table():
    q, k, v = _qkv()
    layout = SegmentLayout(2, 6, 2, True)
    with dispatch.use_table(_table(_small_entries())):
        assert seam.choose_backend("auto", q, k, v, layout, 0.0) == "sdpa"


@needs_kernel
def test_auto_follows_the_table_and_falls_back_without_one(monkeypatch, caplog):
    monkeypatch.setattr(seam, "_auto_device_ok", lambda q: True)
    q, k, v = _qkv()
    layout = SegmentLayout(2, 6, 2, True)
    with dispatch.use_table(None), caplog.at_level("INFO", logger="rmt_fast.attention"):
        assert seam.choose_backend("auto", q, k, v, layout, 0.0) == "sdpa"
    assert "no measured dispatch table" in caplog.text
    with dispatch.use_table(_table(_small_entries())):
        assert seam.choose_backend("auto", q, k, v, layout, 0.0) == "triton"
    with dispatch.use_table(_table(_small_entries(backend="sdpa"))):
        assert seam.choose_backend("auto", q, k, v, layout, 0.0) == "sdpa"
    with dispatch.use_table(_table(_small_entries())):  # measured in float32 only
        assert seam.choose_backend("auto", *_qkv(dtype=torch.float64), layout, 0.0) == "sdpa"
    # the forced backend ignores the table, and still refuses what the kernel cannot run
    with dispatch.use_table(None):
        assert seam.choose_backend("triton", q, k, v, layout, 0.0) == "triton"
        with pytest.raises(ValueError, match="attn_backend='triton' cannot run this case: head dim 8"):
            seam.choose_backend("triton", *_qkv(d=8), layout, 0.0)


@needs_kernel
def test_graphed_and_grad_flags_pick_their_measurements(monkeypatch):
    monkeypatch.setattr(seam, "_auto_device_ok", lambda q: True)
    q, k, v = _qkv()
    layout = SegmentLayout(2, 6, 2, True)
    entries = [
        _entry(dtype="float32", head_dim=16, bh="BH<=24", mode="graphed"),
        _entry(dtype="float32", head_dim=16, bh="BH<=24", mode="eager", backend="sdpa"),
        _entry(dtype="float32", head_dim=16, bh="BH<=24", needs_grad=True),
    ]
    with dispatch.use_table(_table(entries)):
        assert seam.choose_backend("auto", q, k, v, layout, 0.0) == "sdpa"
        with seam.graphed_step():
            assert seam.choose_backend("auto", q, k, v, layout, 0.0) == "triton"
        qg = q.clone().requires_grad_(True)
        assert seam.choose_backend("auto", qg, k, v, layout, 0.0) == "triton"  # the training entry
        with torch.no_grad():
            assert seam.choose_backend("auto", qg, k, v, layout, 0.0) == "sdpa"


@needs_kernel
def test_table_installs_its_launch_configs(monkeypatch):
    monkeypatch.setattr(seam, "_auto_device_ok", lambda q: True)
    cfg = dict(dtype="float32", head_dim=16, fwd=[32, 16, 4, 2], dq=[16, 16, 4, 2], dkdv=[16, 32, 4, 2])
    with dispatch.use_table(_table(_small_entries(), [cfg])):
        assert seam.choose_backend("auto", *_qkv(), SegmentLayout(2, 6, 2, True), 0.0) == "triton"
    assert launch_configs.launch_config("fwd", 16, torch.float32).as_tuple() == (32, 16, 4, 2)
    assert launch_configs.launch_config("dkdv", 16, torch.float32).as_tuple() == (16, 32, 4, 2)


# ------------------------------------------------------------------------------------------- end to end
def _gpt2_d16():
    cfg = tf.GPT2Config(
        n_layer=3,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.GPT2LMHeadModel(cfg)


@needs_kernel
def test_fastrmt_auto_runs_the_table_choice_deciding_once_per_segment(monkeypatch):
    mod = seam._triton()
    monkeypatch.setattr(seam, "_auto_device_ok", lambda q: True)
    calls = {"supported": 0, "kernel": []}
    real_supported, real_kernel = mod.rmt_attention_supported, mod.rmt_attention

    def supported(*a, **kw):
        calls["supported"] += 1
        return real_supported(*a, **kw)

    def kernel(*a, **kw):
        calls["kernel"].append(kw.get("check", True))
        return real_kernel(*a, **kw)

    monkeypatch.setattr(mod, "rmt_attention_supported", supported)
    monkeypatch.setattr(mod, "rmt_attention", kernel)
    torch.manual_seed(0)
    model = _gpt2_d16()
    auto = FastRMT(copy.deepcopy(model), 2, 6, attn_backend="auto").eval()
    sdpa = FastRMT(copy.deepcopy(model), 2, 6, attn_backend="sdpa").eval()
    sdpa.load_state_dict(auto.state_dict())
    ids = torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(4))  # 3 segments
    with torch.no_grad(), dispatch.use_table(_table(_small_entries())):
        a = auto(ids, labels=ids)
    b = sdpa(ids, labels=ids)
    assert calls["supported"] == 3  # once per segment, not once per layer (3 layers)
    assert calls["kernel"] == [False] * 9  # every layer ran the kernel, unvalidated
    assert_close(a.logits, b.logits, tol=1e-6, name="logits")  # was atol 1e-5 over a ~9.5-norm: no looser
    assert_close(a.loss, b.loss, dtype=torch.float32, name="loss")  # was 1e-6 + 1e-5 |b|: no looser

    calls["supported"], calls["kernel"] = 0, []
    with torch.no_grad(), dispatch.use_table(_table(_small_entries(backend="sdpa"))):
        c = auto(ids, labels=ids)
    assert calls["kernel"] == [] and calls["supported"] == 0  # the table names SDPA: the kernel is not asked
    assert_close(c.logits, b.logits, tol=1e-6, name="logits")


@needs_kernel
def test_training_decision_uses_the_grad_entries(monkeypatch):
    mod = seam._triton()
    monkeypatch.setattr(seam, "_auto_device_ok", lambda q: True)
    used = []
    real_kernel = mod.rmt_attention
    monkeypatch.setattr(mod, "rmt_attention", lambda *a, **kw: used.append(1) or real_kernel(*a, **kw))
    torch.manual_seed(0)
    rmt = FastRMT(_gpt2_d16(), 2, 6, attn_backend="auto")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    entries = [e for e in _small_entries() if not e["needs_grad"]] + [
        e for e in _small_entries(backend="sdpa") if e["needs_grad"]
    ]
    with dispatch.use_table(_table(entries)):
        rmt(ids, labels=ids).loss.backward()
        assert used == []  # training: SDPA measured faster
        with torch.no_grad():
            rmt(ids, labels=ids)
        assert len(used) == 6  # inference: Triton, 2 segments x 3 layers


# --------------------------------------------------------------------------- the kernels benchmark's report
def test_kernels_benchmark_reports_auto_choice_and_targets(tmp_path):
    from rmt_fast.bench import kernels

    q = torch.zeros(8, 12, 532, 64, dtype=torch.float16)
    layout = kernels._layout(8, 532, "cpu", padded=False)
    table = _table([_entry(), _entry(needs_grad=True, backend="sdpa")])
    with dispatch.use_table(table):
        assert kernels._auto_choices(q, layout) == {"fwd": "triton", "fwd+bwd": "sdpa", "graphed": "sdpa"}
    with dispatch.use_table(None):
        assert set(kernels._auto_choices(q, layout).values()) == {"sdpa"}
    assert len(kernels.settings(True)) == 2 * 2 * 2 * 3

    def row(method, mode, ms, layout="full", B=8, T=532, host_ms=None):
        return dict(
            method=method,
            mode=mode,
            ms=ms,
            tflops=1.0,
            status="ok",
            dtype="float16",
            D=64,
            layout=layout,
            B=B,
            T=T,
            auto_choice="sdpa",
            auto_choice_graphed="",
            host_ms=host_ms,
        )

    rows = [
        row("triton", "fwd", 0.10),
        row("sdpa_flash_nomask", "fwd", 0.08),
        row("triton", "fwd+bwd", 0.30, host_ms=0.6),
        row("sdpa_flash_nomask", "fwd+bwd", 0.28),
        row("sdpa", "fwd+bwd", 0.28, host_ms=0.3),
        row("sdpa_cudnn", "fwd+bwd", 0.24),
        row("flex", "fwd+bwd", 0.25),
        row("xformers", "fwd+bwd", 0.1),  # xformers is no baseline
        row("triton", "fwd", 0.03, "padded"),
        row("sdpa", "fwd", 0.07, "padded"),
        row("flex", "fwd", 0.05, "padded"),
        row("triton", "fwd", 0.10, B=1, T=4096),
        row("sdpa_flash_nomask", "fwd", 0.09, B=1, T=4096),
    ]
    got = {(c["target"][:12], c["mode"], c["T"]): (c["speedup"], c["met"]) for c in kernels.targets(rows)}
    assert got == {
        ("forward >= 1", "fwd", 532): (0.8, False),
        ("forward + ba", "fwd+bwd", 532): (0.933, True),
        ("padded >= 2x", "fwd", 532): (2.333, True),
        ("forward >= 0", "fwd", 4096): (0.9, True),
        ("device fwd+b", "fwd+bwd", 532): (0.8, False),  # against cuDNN's 0.24
        ("device fwd >", "fwd", 532): (1.667, False),  # padded: against Flex's 0.05, needs 2x
        ("host fwd+bwd", "fwd+bwd", 532): (0.5, False),
    }
    from rmt_fast.bench.common import save_plot

    save_plot(kernels.plot(None, rows, {"env": {"torch": "x", "triton": "y"}}), tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 0


# ------------------------------------------------------------------- the profile counts Triton as attention
class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


class _Evt:
    def __init__(self, name, start, end, parent=None, device_type="DeviceType.CPU", kernels=()):
        self.name, self.time_range, self.cpu_parent, self.device_type = name, _Range(start, end), parent, device_type
        self.cpu_time_total = self.self_cpu_time_total = end - start
        self.self_device_time_total = sum(k.duration for k in kernels)
        self.kernels = list(kernels)
        self.is_python_function = False


def test_profile_counts_triton_kernels_and_launcher_as_attention():
    from torch.autograd.profiler_util import Kernel

    from rmt_fast.bench import profile

    scope = _Evt(profile.ATTENTION_SCOPE, 0, 300)  # 300 us in the backend call
    empty = _Evt("aten::empty", 10, 30, parent=scope)  # 20 us of it in an aten op
    mm = _Evt("aten::mm", 400, 450, kernels=[Kernel("gemm", 0, 40.0)])
    kern = [
        _Evt("_rmt_attn_fwd_kernel", 500, 560, device_type="DeviceType.CUDA"),
        _Evt("gemm", 400, 440, device_type="DeviceType.CUDA"),
    ]
    events = [scope, empty, mm, *kern]
    assert profile._classify(empty) == ("attention", True)
    assert profile._triton_kernels(events) == (0.06, 1)
    assert profile._scope_outside_aten_ms(events) == pytest.approx(0.28)
    res = profile.analyse(events, None, wall_ms=1.0, n_segments=1, calls=1, cuda=True)
    assert res["cpu_ms"]["attention"] == pytest.approx(0.02 + 0.28)
    assert res["cpu_ms"]["python overhead"] == pytest.approx(1.0 - 0.02 - 0.05 - 0.28)
    assert res["device_ms"]["attention"] == pytest.approx(0.06) and res["device_ms"]["matmul"] == pytest.approx(0.04)
    assert res["kernels_per_segment_by_category"]["attention"] == 1


def test_attention_scope_wraps_the_backend_call_and_restores_it():
    from rmt_fast.bench import profile

    original = seam.run_backend
    with profile.attention_scope():
        assert seam.run_backend is not original
        with torch.profiler.profile() as prof:
            q, k, v = _qkv()
            seam.run_backend("sdpa", q, k, v, SegmentLayout(2, 6, 2, True), scale=None, dropout_p=0.0)
    assert seam.run_backend is original
    names = [e.name for e in prof.events()]
    assert profile.ATTENTION_SCOPE in names
    sdpa = next(e for e in prof.events() if e.name == "aten::scaled_dot_product_attention")
    assert profile._classify(sdpa)[0] == "attention"


# ------------------------------------------------------------------------------------------------- GPU
def _spy_kernel(monkeypatch):
    mod = seam._triton()
    used = []
    real = mod.rmt_attention
    monkeypatch.setattr(mod, "rmt_attention", lambda *a, **kw: used.append(1) or real(*a, **kw))
    return used


def _gpu_entries(mode="eager", backend="triton", needs_grad=False):
    # gpt2_d16 on CUDA, fp16, batch 2, segment 6 + 2 x 2 memory: T = 10, B x H = 8
    return [
        _entry(
            dtype="float16",
            head_dim=16,
            t="T<=768",
            bh="BH<=24",
            causal=True,
            padded=p,
            needs_grad=needs_grad,
            mode=mode,
            backend=backend,
        )
        for p in (True, False)
    ]


@pytest.mark.gpu
def test_gpu_auto_is_sdpa_without_a_table_and_follows_one(monkeypatch):
    used = _spy_kernel(monkeypatch)
    torch.manual_seed(0)
    rmt = FastRMT(_gpt2_d16(), 2, 6, attn_backend="auto").to("cuda", torch.float16).eval()
    ids = torch.randint(3, VOCAB, (2, 15), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad(), dispatch.use_table(None):
        a = rmt(ids)
    assert used == []
    with torch.no_grad(), dispatch.use_table(_table(_gpu_entries())):
        b = rmt(ids)
    assert len(used) == 9  # 3 segments x 3 layers
    # fp16 table-chosen kernels against the default ones through 3 layers and 3 segments: ten times fp16's bound
    assert_close(b.logits, a.logits, tol=10 * TOL[torch.float16], name="logits")


@pytest.mark.gpu
def test_gpu_graph_capture_uses_the_graphed_entries(monkeypatch):
    used = _spy_kernel(monkeypatch)
    torch.manual_seed(0)
    model = _gpt2_d16()
    graphed = FastRMT(copy.deepcopy(model), 2, 6, cuda_graph=True).to("cuda", torch.float16).eval()
    eager = FastRMT(copy.deepcopy(model), 2, 6).to("cuda", torch.float16).eval()
    ids = torch.randint(3, VOCAB, (2, 18), generator=torch.Generator().manual_seed(4)).cuda()
    entries = _gpu_entries(mode="graphed") + _gpu_entries(mode="eager", backend="sdpa")
    with torch.no_grad(), dispatch.use_table(_table(entries)):
        eager(ids)
        assert used == []
        graphed(ids)
    assert graphed._graphs.captures == 1 and len(used) > 0  # warm-up and capture ran the kernel


# ------------------------------------------------------------------------------------- per-device table files
def test_table_files_per_device(tmp_path, monkeypatch):
    """The file look-up as on a GPU (device and architecture faked): no file -> SDPA with the path named, read once
    and cached; a measured file for this architecture -> its answers; another architecture's or an unmeasured one
    -> ignored with a warning."""
    monkeypatch.setattr(dispatch, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(dispatch, "arch_of", lambda device=None: "sm90")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv(dispatch.ENV_TABLE, raising=False)
    q = torch.zeros(8, 12, 532, 64, dtype=torch.float16)
    layout = SegmentLayout(10, 512, 10, True)
    d = dispatch.decide(q, q, layout, needs_grad=False, graphed=False)
    assert d.backend == "sdpa" and str(tmp_path / "sm90.json") in d.reason
    (tmp_path / "sm90.json").write_text(json.dumps(_table([_entry()])))
    assert dispatch.decide(q, q, layout, needs_grad=False, graphed=False).backend == "sdpa"  # cached: not re-read
    dispatch.reset_cache()
    assert dispatch.decide(q, q, layout, needs_grad=False, graphed=False).backend == "triton"
    for bad in (_table([_entry()], arch="sm80"), _table([_entry()], measured=False)):
        (tmp_path / "sm90.json").write_text(json.dumps(bad))
        dispatch.reset_cache()
        with pytest.warns(RuntimeWarning, match="ignoring"):
            assert dispatch.decide(q, q, layout, needs_grad=False, graphed=False).backend == "sdpa"
    # preload() reads the file before any step runs (so a compiled step only looks up dictionaries)
    dispatch.reset_cache()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tmp_path / "sm90.json").write_text(json.dumps(_table([_entry()])))
    dispatch.preload()
    assert 0 in dispatch._CACHE and dispatch._CACHE[0] is not None

"""FastARMT(cuda_graph=True): the graph runner's static-buffer logic on the CPU (no capture, and a stand-in capture
that runs warm-ups and replays as CUDA would), its step count, cache bound and weight refresh; replay on a GPU."""

import functools

import pytest
import torch
from armt_helpers import ids, randomize_memory
from hypothesis import given, settings
from hypothesis import strategies as st
from models import DECODERS
from numerics import TOL, assert_close

from rmt_fast import FastARMT
from rmt_fast.armt import graphs
from rmt_fast.armt.base import ARMTOutput
from rmt_fast.armt.graphs import ARMTGraphRunner
from rmt_fast.cuda_graph import StaticStep, capture_device


def _pair(name="llama", diagonal=False, m=3, size=8, layers=None, device="cpu", dtype=torch.float32, **kw):
    """(eager, graphed) FastARMT over copies of one backbone with the same random memory weights, in eval mode."""
    model_kw = {} if layers is None else ({"n_layer": layers} if name == "gpt2" else {"num_hidden_layers": layers})
    torch.manual_seed(0)
    eager = FastARMT(DECODERS[name](**model_kw), m, size, d_mem=32, diagonal=diagonal)
    randomize_memory(eager)
    torch.manual_seed(0)
    graphed = FastARMT(DECODERS[name](**model_kw), m, size, d_mem=32, diagonal=diagonal, cuda_graph=True, **kw)
    graphed.load_state_dict(eager.state_dict())
    return eager.to(device, dtype).eval(), graphed.to(device, dtype).eval()


def _same(a, b, exact=True):
    """Two ARMT outputs: logits, loss and every layer's A and z bit for bit (fp32 on the CPU runs the same ops)."""
    pairs = [("A", a.memory_state.A, b.memory_state.A), ("z", a.memory_state.z, b.memory_state.z)]
    if a.logits is not None or b.logits is not None:
        pairs.append(("logits", a.logits, b.logits))
    if a.loss is not None or b.loss is not None:
        pairs.append(("loss", a.loss, b.loss))
    for name, x, y in pairs:
        assert x is not None and y is not None and x.shape == y.shape, name
        if name == "loss" and x.isnan().all() and y.isnan().all():
            continue  # a loss over no predicted token is NaN in both (a NaN anywhere else fails below)
        if exact:
            assert torch.equal(x, y), (name, (x - y).abs().max())
        else:
            assert_close(x, y, tol=1e-6, name=name)  # was atol 1e-5 (rtol 0) over outputs of norm 1-15


def _steps(armt):
    return sum(len(g.steps) for g in armt._graphs.groups.values())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("diagonal", [False, True], ids=["sequential", "diagonal"])
def test_replay_equals_eager_exactly(name, diagonal):
    eager, graphed = _pair(name, diagonal)
    x = ids(2, 29)  # 4 segments, the last one short
    with torch.no_grad():
        a, b = eager(x, labels=x), graphed(x, labels=x)
        _same(a, b)
        # the stream goes on from the state: every segment reads the memory (other step shapes)
        _same(eager(x, memory_state=a.memory_state), graphed(x, memory_state=b.memory_state))
        # the same shapes again (replays of cached steps), without logits
        c, d = eager(x, labels=x, return_logits=False), graphed(x, labels=x, return_logits=False)
        assert d.logits is None
        _same(c, d)


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(1, 40), diagonal=st.booleans(), stream=st.booleans())
def test_replay_equals_eager_drawn(batch, tokens, diagonal, stream):
    eager, graphed = _eager_graphed(diagonal)
    x = ids(batch, tokens, seed=tokens)
    with torch.no_grad():
        state = eager(ids(batch, 8, seed=99)).memory_state if stream else None
        _same(eager(x, labels=x, memory_state=state), graphed(x, labels=x, memory_state=state))


@functools.cache
def _eager_graphed(diagonal):
    return _pair("llama", diagonal, layers=3)


def test_state_is_carried_through_replays_and_reset_per_call():
    """A and z of every layer: a stream cut in calls equals one call; a new stream starts from zero, not from
    what the buffers hold."""
    for diagonal in (False, True):
        eager, graphed = _pair("gpt2", diagonal, layers=3)
        x = ids(2, 48)
        with torch.no_grad():
            whole = eager(x)
            first = graphed(x[:, :16])
            second = graphed(x[:, 16:], memory_state=first.memory_state)
            _same(eager(x[:, 16:], memory_state=eager(x[:, :16]).memory_state), second)
            # the diagonal groups the cells of one call differently from those of two: equal up to rounding
            _same(
                whole,
                ARMTOutput(logits=torch.cat([first.logits, second.logits], 1), memory_state=second.memory_state),
                exact=not diagonal,
            )
            assert second.memory_state.A.abs().sum(dim=(1, 2, 3, 4)).min() > 0  # every layer wrote
            _same(eager(x[:, 16:]), graphed(x[:, 16:]))  # fresh stream after the buffers held a state


def test_outputs_are_not_overwritten_by_later_calls():
    eager, graphed = _pair("llama", True)
    with torch.no_grad():
        first = graphed(ids(2, 24, seed=1))
        kept = first.logits.clone(), first.memory_state.A.clone(), first.memory_state.z.clone()
        graphed(ids(2, 24, seed=2))
    assert torch.equal(first.logits, kept[0]) and torch.equal(first.memory_state.A, kept[1])
    assert torch.equal(first.memory_state.z, kept[2])


# ------------------------------------------------------------------------------------- capture (stand-in)
class _FakeGraph:
    def __init__(self, fn, inputs):
        self.fn, self.inputs = fn, inputs

    def replay(self):
        self.fn(**self.inputs)

    def reset(self):
        pass


class _StandInCapture(StaticStep):
    """What capture does to the buffers on CUDA, on the CPU: warm-up calls run the step for real, then every
    replay runs it again over the same static inputs and writes the same output dict."""

    built: list = []

    def __init__(self, fn, inputs, capture, warmup=2, pool=None, device=None):
        super().__init__(fn, inputs, capture=False)
        if capture:
            assert capture_device(inputs, device).type == "cpu"  # resolvable for every step, inputs or not
            for _ in range(warmup):
                fn(**inputs)
            captured = fn(**inputs)  # the captured run (a real capture does not execute)

            def replay_into(**kw):  # a replay writes the captured outputs' memory, as CUDA does
                for key, value in fn(**kw).items():
                    if value is not None:
                        captured[key].copy_(value)

            self.graph = _FakeGraph(replay_into, inputs)
            self.outputs = captured
            type(self).built.append(self)


@pytest.fixture
def stand_in(monkeypatch):
    _StandInCapture.built = []
    monkeypatch.setattr(graphs, "StaticStep", _StandInCapture)
    return _StandInCapture


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a capture that falls back is a failure here
@pytest.mark.parametrize("diagonal", [False, True], ids=["sequential", "diagonal"])
def test_captured_steps_replay_equal_eager_and_warmup_leaves_the_state(stand_in, diagonal):
    eager, graphed = _pair("llama", diagonal, layers=4)
    graphed._graphs.capture = True
    x = ids(2, 6 * 8)  # N = 6 full segments, L = 4 layers
    with torch.no_grad():
        a, b = eager(x, labels=x), graphed(x, labels=x)
        _same(a, b)
        # distinct steps: sequential: a stream's first segment, the others; diagonal: the ramp up (3 steps, each
        # holding segment 0), the full step holding segment 0, the other full steps, the ramp down (3 steps)
        assert graphed._graphs.captures == (2 if not diagonal else 3 + 1 + 1 + 3) == _steps(graphed)
        _same(eager(x, labels=x, memory_state=a.memory_state), graphed(x, labels=x, memory_state=b.memory_state))
        # continuing: no first segment, so the sequential needs nothing new and the diagonal a new ramp up
        assert graphed._graphs.captures == (2 if not diagonal else 8 + 3)
        _same(eager(x[:, :29]), graphed(x[:, :29]))  # a short last segment, no labels: steps without inputs
    assert graphed._graphs.captures == _steps(graphed) == len(stand_in.built)
    assert all(step.graph is not None for group in graphed._graphs.groups.values() for step in group.steps.values())


def test_capture_failure_warns_once_and_runs_eagerly():
    eager, graphed = _pair("gpt2", True)
    graphed._graphs.capture = True  # on the CPU, capture fails (no CUDA streams)
    x = ids(2, 29)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="capture of a FastARMT step failed"):
        b = graphed(x)
    with torch.no_grad():
        _same(eager(x), b)
    assert graphed._graphs.captures == 0 and _steps(graphed) > 0


# ------------------------------------------------------------------------------------------- the cache
def test_cache_is_bounded_least_recently_used_first_out():
    eager, graphed = _pair("llama", False)
    runner = graphed._graphs = ARMTGraphRunner(graphed, max_graphs=2)
    with torch.no_grad():
        graphed(ids(2, 16))  # steps: a stream's first segment (F), then a full segment (R)
        group = next(iter(runner.groups.values()))
        first, full = list(group.steps)
        graphed(ids(2, 8))  # F only: now the most recently used
        state = eager(ids(2, 8)).memory_state
        # continuing with one short segment (S): a third step, so the least recently used one (R) goes
        _same(eager(ids(2, 5), memory_state=state), graphed(ids(2, 5), memory_state=state))
    assert list(group.steps)[0] == first and full not in group.steps
    assert runner.evictions == 1 and len(group.steps) == 2 and runner.overflows == 0


def test_a_call_needing_more_steps_than_the_bound_does_not_thrash():
    eager, graphed = _pair("llama", True, layers=4)
    runner = graphed._graphs = ARMTGraphRunner(graphed, max_graphs=3)
    x = ids(1, 6 * 8)
    with torch.no_grad():
        _same(eager(x), graphed(x))  # 8 distinct steps, room for 3: the other steps run eagerly
    assert _steps(graphed) == 3 and runner.evictions == 0 and runner.overflows > 0


def test_groups_are_bounded_and_release_their_steps():
    eager, graphed = _pair("gpt2", True)
    runner = graphed._graphs = ARMTGraphRunner(graphed, max_groups=1)
    with torch.no_grad():
        for b in (2, 3, 2):
            _same(eager(ids(b, 24, seed=b)), graphed(ids(b, 24, seed=b)))
    assert len(runner.groups) == 1 and runner.evictions == 2
    assert next(iter(runner.groups))[0] == 2
    for kwargs, match in ((dict(max_graphs=0), "max_graphs"), (dict(max_groups=True), "max_groups")):
        with pytest.raises(ValueError, match=match):
            ARMTGraphRunner(graphed, **kwargs)


def test_changed_weights_drop_the_graphs_and_are_used():
    eager, graphed = _pair("llama", True)
    x = ids(2, 24)
    with torch.no_grad():
        graphed(x)
        old = graphed._graphs._stacks[1]
        for model in (eager, graphed):  # an in-place update, as an optimizer step makes
            model.assoc[1].W_mv.weight.mul_(1.5)
            model.model.model.layers[0].mlp.down_proj.weight.add_(0.01)
        _same(eager(x), graphed(x))
        assert graphed._graphs._stacks[1] is not old
        graphed.load_state_dict(eager.state_dict())  # loading bumps the versions too: the same values again
        _same(eager(x), graphed(x))


@pytest.mark.slow
def test_compile_step_inside_the_graphs():
    """compile_step with cuda_graph=True: the runner's steps call the compiled cells (dynamo, eager backend)."""
    eager, graphed = _pair("llama", True, compile_step={"backend": "eager"})
    x = ids(2, 29)
    with torch.no_grad():
        _same(eager(x, labels=x), graphed(x, labels=x), exact=False)
    assert graphed._compiled is not None


# ----------------------------------------------------------------------------------------------- scope
def test_training_is_refused_before_anything_is_built():
    _, graphed = _pair("gpt2", False)
    with pytest.raises(RuntimeError, match="inference only"):
        graphed(ids(1, 16))
    assert graphed._graphs.groups == {} and graphed._graphs._stacks is None


def test_attention_mask_takes_the_eager_path_and_modes_mix():
    eager, graphed = _pair("gpt2", True)
    x = ids(2, 20)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad():
        _same(eager(x, attention_mask=mask), graphed(x, attention_mask=mask))
    assert graphed._graphs.groups == {}
    with torch.inference_mode():
        a = graphed(x)
    with torch.no_grad():  # buffers made under inference_mode still take in-place copies outside it
        _same(a, graphed(x))
        _same(eager(x), graphed(x))
    generated = graphed.generate(x, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, eager.generate(x, max_new_tokens=3, do_sample=False))


def test_released_runner_builds_anew():
    eager, graphed = _pair("gpt2", False)
    with torch.no_grad():
        graphed(ids(1, 16))
        graphed._graphs.release()
        assert graphed._graphs.groups == {} and graphed._graphs._stacks is None
        _same(eager(ids(1, 16)), graphed(ids(1, 16)))


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("diagonal", [False, True], ids=["sequential", "diagonal"])
def test_gpu_replay_equals_eager_bf16(diagonal):
    eager, graphed = _pair("llama", diagonal, layers=4, m=4, size=16, device="cuda", dtype=torch.bfloat16)
    x = ids(2, 16 * 9 + 5).cuda()  # 10 segments, the last one short
    with torch.inference_mode():
        a, b = eager(x), graphed(x)
        c, d = eager(x, memory_state=a.memory_state), graphed(x, memory_state=b.memory_state)
    assert graphed._graphs.captures == _steps(graphed) > 0
    pairs = {
        "logits": (a.logits, b.logits),
        "continued logits": (c.logits, d.logits),
        "A": (c.memory_state.A, d.memory_state.A),
        "z": (c.memory_state.z, d.memory_state.z),
    }
    for name, (u, v) in pairs.items():
        # bf16 replay against bf16 eager through 10 segments of recurrence: twice the bf16 bound, as before
        assert_close(v, u, tol=2 * TOL[torch.bfloat16], name=name)


@pytest.mark.gpu
def test_gpu_replays_do_not_grow_memory():
    _, graphed = _pair("llama", True, layers=4, m=4, size=16, device="cuda", dtype=torch.bfloat16)
    x = ids(1, 16 * 12).cuda()
    with torch.inference_mode():
        graphed(x, return_logits=False)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            graphed(x, return_logits=False)
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 1024 * 1024

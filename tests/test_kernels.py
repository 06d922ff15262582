"""Triton expert kernels against the plain-PyTorch reference, and the reference against transformers'
eager formulation through autograd. On CPU the kernels run under TRITON_INTERPRET=1 (see conftest)."""

import logging
import math

import pytest
import torch
from _moe_inputs import LAYOUTS, make_inputs
from conftest import DEVICE, KERNEL_DTYPES, TOLERANCE, rel_err, requires_triton

from hf_hetermoe.kernels import ExpertLayout, build_routing, moe_experts
from hf_hetermoe.kernels import reference as ref
from hf_hetermoe.kernels.layout import w1_logical

# (T, H, I, E, k, routing): T below one row tile, odd H and I, prime E, k = 1, k = E, experts without
# tokens, every token on one expert.
EDGE_SHAPES = {
    "T<block": (5, 24, 20, 3, 2, "random"),
    "odd_H_I_prime_E": (37, 33, 19, 7, 3, "random"),
    "k=1": (23, 32, 16, 5, 1, "random"),
    "k=E": (9, 16, 24, 4, 4, "random"),
    "empty_experts": (3, 16, 16, 11, 2, "random"),
    "one_expert": (29, 16, 24, 5, 1, "one_expert"),
    "full_and_tail_tiles": (45, 16, 24, 3, 2, "random"),
}


def _triton_ops():
    from hf_hetermoe.kernels import triton_ops

    return triton_ops


def _fwd_bwd(impl, inputs, layout, routing, dout, block_m=None, release_gu=False):
    x, index, weights, w1, w2, b1, b2 = inputs
    extra = (block_m,) if block_m is not None else ()
    out, gu = impl.experts_forward(x, w1, w2, b1, b2, weights, routing, layout, *extra)
    saved = gu.clone()  # the Triton backward overwrites gu with its gradient
    more = (release_gu,) if release_gu else ()
    grads = impl.experts_backward(dout, x, w1, w2, b1, b2, weights, routing, gu, layout, *extra, *more)
    if release_gu:
        assert gu.untyped_storage().size() == 0  # freed before dW2 (vendor path)
    return out, saved, grads


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(EDGE_SHAPES), ids=list(EDGE_SHAPES))
def test_triton_matches_reference_edge_shapes(shape, dtype):
    _check_triton_vs_reference(EDGE_SHAPES[shape], LAYOUTS["mixtral"], dtype)


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "mixtral"])
def test_triton_matches_reference_layouts(layout):
    _check_triton_vs_reference((19, 24, 20, 5, 2, "random"), LAYOUTS[layout], torch.float32)


def _check_triton_vs_reference(shape, layout, dtype):
    T, H, I, E, k, routing_kind = shape
    triton_ops = _triton_ops()
    inputs = make_inputs(T, H, I, E, k, layout, dtype, DEVICE, routing=routing_kind)
    block_m = triton_ops.block_m_for(DEVICE)
    routing = build_routing(inputs[1], E, block_m)
    dout = torch.randn(T, H, device=DEVICE).to(dtype)
    out_t, gu_t, grads_t = _fwd_bwd(triton_ops, inputs, layout, routing, dout, block_m)
    out_r, gu_r, grads_r = _fwd_bwd(ref, inputs, layout, routing, dout)
    tol = TOLERANCE[dtype]
    assert out_t.dtype == inputs[0].dtype and out_t.shape == (T, H)
    assert rel_err(out_t, out_r) < tol
    assert rel_err(gu_t, gu_r) < tol
    names = ["dx", "d_top_k_weights", "dw1", "dw2", "db1", "db2"]
    for name, g_t, g_r in zip(names, grads_t, grads_r):
        if g_r is None:
            assert g_t is None, name
            continue
        assert g_t.shape == g_r.shape and g_t.dtype == g_r.dtype, name
        assert rel_err(g_t, g_r) < tol, f"{name}: {rel_err(g_t, g_r):.2e}"


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_activation_pass_matches_reference(layout):
    """The standalone activation pass (after CUTLASS's gate/up on the GPU, which has no fused epilogue) on every
    layout's column order and activation, against the reference."""
    layout_ = LAYOUTS[layout]
    S, inter = 13, 40
    gu = torch.randn(S, 2 * inter if layout_.has_gate else inter, device=DEVICE)
    h = gu.new_empty(S, inter)
    _triton_ops().activation(gu, h, layout_)
    assert rel_err(h, ref.glu_forward(*ref._split(gu, layout_), layout_)) < 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_matches_eager_autograd(layout):
    """The explicit forward/backward formulas equal autograd through transformers' eager loop."""
    layout_ = LAYOUTS[layout]
    x, index, weights, w1, w2, b1, b2 = make_inputs(21, 24, 20, 5, 2, layout_, torch.float32, "cpu")
    leaves = [t.requires_grad_() for t in (x, weights, w1, w2, b1, b2) if t is not None]
    out = moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout_, backend="reference")
    expected = ref.experts_eager(x, index, weights, w1, w2, b1, b2, layout_)
    assert rel_err(out, expected) < 1e-5
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(expected, leaves, dout)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@requires_triton
@pytest.mark.triton_interpret
def test_op_triton_backend_through_autograd():
    layout = LAYOUTS["gpt_oss"]
    x, index, weights, w1, w2, b1, b2 = make_inputs(13, 16, 16, 4, 2, layout, torch.float32, DEVICE)
    leaves = [t.requires_grad_() for t in (x, weights, w1, w2, b1, b2)]
    out = moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout, backend="triton")
    expected = ref.experts_eager(x, index, weights, w1, w2, b1, b2, layout)
    assert rel_err(out, expected) < 1e-5
    for g, w in zip(
        torch.autograd.grad(out.square().sum(), leaves), torch.autograd.grad(expected.square().sum(), leaves)
    ):
        assert rel_err(g, w) < 1e-4


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "no_gate_relu2_bias", "interleaved_gelu"])
def test_forward_without_grad_writes_no_pre_activations(layout, monkeypatch):
    """Where no backward can follow, the gated kernel stores the activation only: the same output, bit for bit, as
    the training forward, with and without one dot for gate and up; ``moe_experts`` takes that path under
    ``torch.no_grad`` and when nothing requires a gradient."""
    triton_ops = _triton_ops()
    layout = LAYOUTS[layout]
    x, index, weights, w1, w2, b1, b2 = make_inputs(19, 32, 16, 5, 2, layout, torch.float32, DEVICE)
    block_m = triton_ops.block_m_for(DEVICE)
    routing = build_routing(index, 5, block_m)
    args = (x, w1, w2, b1, b2, weights, routing, layout, block_m)
    for one_dot in ("1", "0"):
        monkeypatch.setenv("HETERMOE_ONE_DOT_GATE_UP", one_dot)
        out_train, gu = triton_ops.experts_forward(*args)
        out, none = triton_ops.experts_forward(*args, keep_gu=False)
        assert none is None and gu.shape[0] == 38
        assert torch.equal(out, out_train)
    calls = []
    forward = triton_ops.experts_forward
    monkeypatch.setattr(
        triton_ops, "experts_forward", lambda *a, keep_gu=True: calls.append(keep_gu) or forward(*a, keep_gu=keep_gu)
    )
    expected = ref.experts_eager(x, index, weights, w1, w2, b1, b2, layout)

    def run():
        return moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout, backend="triton")

    with torch.no_grad():
        w1.requires_grad_()
        assert rel_err(run(), expected) < 1e-5
    w1.requires_grad_(False)
    assert rel_err(run(), expected) < 1e-5
    w1.requires_grad_()
    run()
    assert calls == [False, False, True]


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=[requires_triton, pytest.mark.triton_interpret])]
)
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "no_gate_relu2_bias"])
def test_recompute_saves_no_pre_activations_and_matches(layout, backend):
    """``recompute=True``: nothing of ``[S, N1]`` is saved for the backward, and the gradients equal the default's
    (the backward's gate/up matmul reproduces the forward's pre-activations exactly)."""
    layout = LAYOUTS[layout]
    T, E, k = 17, 4, 2
    x, index, weights, w1, w2, b1, b2 = make_inputs(T, 32, 16, E, k, layout, torch.float32, DEVICE)
    leaves = [t.requires_grad_() for t in (x, weights, w1, w2) + ((b1, b2) if b1 is not None else ())]
    n1 = w1_logical(w1, layout).shape[1]
    results = []
    for recompute in (False, True):
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout, backend=backend, recompute=recompute)
        assert ((T * k, n1) in saved) == (not recompute)
        results.append((out, torch.autograd.grad(out.square().sum(), leaves)))
    (out, grads), (out_r, grads_r) = results
    assert torch.equal(out, out_r)
    for g, g_r in zip(grads, grads_r):
        assert rel_err(g_r, g) < 1e-6


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "no_gate_relu2_bias"])
def test_recompute_backward_in_chunks_matches_reference(layout, dtype, monkeypatch):
    """``recompute=True`` with ``HETERMOE_RECOMPUTE_CHUNKS``: the backward runs over fixed chunks of sorted rows, its
    experts' runs spanning chunks (their weight gradients summed chunk by chunk), and matches the reference."""
    triton_ops = _triton_ops()
    layout = LAYOUTS[layout]
    T, H, I, E, k = 45, 32, 16, 5, 2
    x, index, weights, w1, w2, b1, b2 = make_inputs(T, H, I, E, k, layout, dtype, DEVICE)
    leaves = [t.requires_grad_() for t in (x, weights, w1, w2) + ((b1, b2) if b1 is not None else ())]
    dout = torch.randn(T, H, device=DEVICE).to(dtype)
    chunked = []
    real = triton_ops.experts_backward_recompute
    monkeypatch.setattr(triton_ops, "experts_backward_recompute", lambda *a: chunked.append(a[-2]) or real(*a))
    monkeypatch.setenv("HETERMOE_RECOMPUTE_CHUNKS", "3")
    out = moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout, backend="triton", recompute=True)
    got = torch.autograd.grad(out, leaves, dout)
    assert chunked == [triton_ops.recompute_chunk_rows(T * k, w1, w2, layout, 3)]
    assert chunked[0] < T * k
    out_r = moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout, backend="reference")
    want = torch.autograd.grad(out_r, leaves, dout)
    for name, g, w in zip(["dx", "dweights", "dw1", "dw2", "db1", "db2"], got, want):
        assert g.dtype == w.dtype and rel_err(g, w) < TOLERANCE[dtype], f"{name}: {rel_err(g, w):.2e}"


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(EDGE_SHAPES), ids=list(EDGE_SHAPES))
def test_recompute_backward_in_small_chunks_edge_shapes(shape, dtype):
    """Chunks of 5 sorted rows, not aligned to experts or tiles: experts spanning many chunks, empty experts (those
    whose empty run begins at the very end are zeroed by the last chunk), and chunks inside one expert's run."""
    triton_ops = _triton_ops()
    T, H, I, E, k, routing_kind = EDGE_SHAPES[shape]
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, b1, b2 = make_inputs(T, H, I, E, k, layout, dtype, DEVICE, routing=routing_kind)
    block_m = triton_ops.block_m_for(DEVICE)
    routing = build_routing(index, E, block_m)
    dout = torch.randn(T, H, device=DEVICE).to(dtype)
    got = triton_ops.experts_backward_recompute(dout, x, w1, w2, b1, b2, weights, routing, layout, block_m, 5)
    _, gu = ref.experts_forward(x, w1, w2, b1, b2, weights, routing, layout)
    want = ref.experts_backward(dout, x, w1, w2, b1, b2, weights, routing, gu, layout)
    for name, g, w in zip(["dx", "dweights", "dw1", "dw2"], got, want):
        assert rel_err(g, w) < TOLERANCE[dtype], f"{name}: {rel_err(g, w):.2e}"


def test_chunk_routing_clips_each_run_and_tiles_the_chunk():
    from hf_hetermoe.kernels.routing import build_routing_torch, chunk_routing

    index = torch.rand(40, 6).topk(3, dim=-1).indices
    index[index == 4] = 1  # an empty expert in the middle
    routing = build_routing_torch(index, 6, 8)
    for start, end in [(0, 120), (0, 13), (13, 61), (61, 120), (50, 50)]:
        chunk = chunk_routing(routing, start, end, 8)
        assert torch.equal(chunk.order, routing.order[start:end])
        assert torch.equal(chunk.expert, routing.expert[start:end])
        want = routing.offsets.clamp(start, end) - start
        assert torch.equal(chunk.offsets, want.to(torch.int32))
        covered = []
        for e, r0 in zip(chunk.tile_expert.tolist(), chunk.tile_start.tolist()):
            if e == 6:
                continue
            rows = range(r0, min(r0 + 8, int(chunk.offsets[e + 1])))
            assert rows and r0 >= chunk.offsets[e] and all(chunk.expert[r] == e for r in rows)
            covered.extend(rows)
        assert covered == list(range(end - start))
    with pytest.raises(ValueError, match="not inside"):
        chunk_routing(routing, 100, 121, 8)


def test_recompute_chunks_sized_to_the_weight_gradients():
    """``auto``: chunks only where the pre-activations reach half the weight gradients (Mixtral-8x7B at 16 K tokens,
    5 chunks), holding a chunk's transients to a quarter of them; one chunk elsewhere."""
    triton_ops = _triton_ops()
    layout = LAYOUTS["mixtral"]

    def chunks(T, H, I, E, k, forced=None):
        w1 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device="meta")
        w2 = torch.empty(E, H, I, dtype=torch.bfloat16, device="meta")
        rows = triton_ops.recompute_chunk_rows(T * k, w1, w2, layout, forced)
        assert rows % 16 == 0 or rows == T * k
        return -(-T * k // rows)

    assert chunks(16384, 4096, 14336, 8, 2) == 5
    assert chunks(4096, 4096, 14336, 8, 2) == 1
    assert chunks(16384, 2048, 768, 128, 8) == 1
    assert chunks(65536, 2048, 768, 128, 8) == 16
    assert chunks(4096, 2048, 768, 128, 8, forced=3) == 3
    assert chunks(5, 2048, 768, 128, 8, forced=3) == 3
    assert chunks(4096, 2048, 768, 128, 8, forced=1) == 1


def test_recompute_chunks_setting(monkeypatch):
    from hf_hetermoe import env

    for value, want in [("", 1), ("auto", None), ("AUTO", None), ("1", 1), ("6", 6)]:
        monkeypatch.setenv("HETERMOE_RECOMPUTE_CHUNKS", value)
        assert env.recompute_chunks() == want
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("HETERMOE_RECOMPUTE_CHUNKS", bad)
        with pytest.raises(ValueError, match="HETERMOE_RECOMPUTE_CHUNKS"):
            env.recompute_chunks()


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=[requires_triton, pytest.mark.triton_interpret])]
)
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss"])
def test_frozen_experts_skip_the_weight_gradients(layout, backend, monkeypatch):
    """Expert weights that require no gradient (LoRA on attention, frozen experts) get none computed: dx and the
    routing weights' gradient equal the full backward's, and no weight-gradient kernel runs."""
    layout = LAYOUTS[layout]
    x, index, weights, w1, w2, b1, b2 = make_inputs(17, 32, 16, 4, 2, layout, torch.float32, DEVICE)
    x.requires_grad_()
    weights.requires_grad_()
    params = [t for t in (w1, w2, b1, b2) if t is not None]

    def run():
        return moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout, backend=backend)

    for p in params:
        p.requires_grad_()
    out = run()
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, [x, weights], dout)
    for p in params:
        p.requires_grad_(False)
    if backend == "triton":
        triton_ops = _triton_ops()

        def fail(*args, **kwargs):
            raise AssertionError("a weight gradient was computed for frozen experts")

        for name in ("wgrad", "_dw2", "_vendor_wgrad", "expert_colsum"):
            monkeypatch.setattr(triton_ops, name, fail)
    got = torch.autograd.grad(run(), [x, weights], dout)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_compile_fullgraph_traces_the_forward_without_grad():
    """The custom forward op's fake covers the path that saves nothing (inference under torch.compile)."""
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(11, 16, 16, 4, 2, layout, torch.float32, "cpu")

    def infer(x, index, weights, w1, w2):
        return moe_experts(x, index, weights, w1, w2, layout=layout, backend="reference")

    with torch.no_grad():
        got = torch.compile(infer, fullgraph=True, backend="aot_eager")(x, index, weights, w1, w2)
    assert rel_err(got, infer(x, index, weights, w1, w2)) < 1e-6


def test_mixed_dtypes_cast_weights_to_hidden_dtype():
    """fp32 master weights with half-precision activations (autocast): output and grads keep their dtypes."""
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(8, 16, 16, 3, 2, layout, torch.float32, "cpu")
    x = x.to(torch.bfloat16).requires_grad_()
    w1.requires_grad_()
    out = moe_experts(x, index, weights, w1, w2, layout=layout, backend="reference")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w1.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=requires_triton)])
def test_zero_tokens(backend):
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(0, 16, 16, 3, 2, layout, torch.float32, DEVICE)
    w1.requires_grad_()
    out = moe_experts(x, index, weights, w1, w2, layout=layout, backend=backend)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert torch.equal(w1.grad, torch.zeros_like(w1))


@pytest.mark.parametrize("variant", ["default", "recompute", "frozen_experts"])
def test_compile_fullgraph_traces_the_op(variant):
    """The custom ops have fake implementations: torch.compile(fullgraph=True) traces forward and backward, also
    where the forward saves no pre-activations (recompute: an empty stand-in, the backward recomputes from it) and
    where the backward skips the weight gradients (frozen experts: empty stand-ins for them)."""
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(11, 16, 16, 4, 2, layout, torch.float32, "cpu")
    leaf = x if variant == "frozen_experts" else w1
    leaf.requires_grad_()
    recompute = variant == "recompute"

    def step(x, index, weights, w1, w2):
        out = moe_experts(x, index, weights, w1, w2, layout=layout, backend="reference", recompute=recompute)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, index, weights, w1, w2)
    (g_compiled,) = torch.autograd.grad(loss, [leaf])
    (g_eager,) = torch.autograd.grad(step(x, index, weights, w1, w2), [leaf])
    assert rel_err(g_compiled, g_eager) < 1e-6


def test_tuning_cache_round_trip(tmp_path, monkeypatch, caplog):
    """The fastest candidate is kept, written to the cache file, and read back by a fresh process without timing."""
    import json

    from hf_hetermoe.kernels import tuning

    monkeypatch.setenv("HETERMOE_CACHE_DIR", str(tmp_path))
    tuning.clear()
    candidates = [dict(BLOCK_N=128), dict(BLOCK_N=64), dict(BLOCK_N=256)]
    measured = []

    def measure(cands):
        measured.append(cands)
        return [2.0, 1.0, math.inf]  # the last one does not compile

    with caplog.at_level(logging.INFO, logger="hf_hetermoe.tuning"):
        assert tuning.select("k1", candidates, measure) == dict(BLOCK_N=64)
    assert measured == [candidates]
    assert "tuned k1" in caplog.text and "BLOCK_N': 64" in caplog.text  # a first step's pause is explained
    assert json.loads((tmp_path / "tuning.json").read_text()) == {"k1": dict(BLOCK_N=64)}
    tuning.clear()  # as a new process would start
    assert tuning.select("k1", candidates, lambda cands: pytest.fail("tuned again")) == dict(BLOCK_N=64)
    # Nothing runs: the first candidate (the measured default) is the fallback.
    assert tuning.select("k2", candidates, lambda cands: [math.inf] * 3) == dict(BLOCK_N=128)
    tuning.clear()


def test_tuning_times_candidates_in_rotating_rounds():
    """Each candidate is launched twice untimed, then once per round with every candidate in each round and the
    starting candidate rotating; the median of its rounds is its time. A candidate out of shared memory gets inf;
    any other error propagates."""
    from hf_hetermoe.kernels import tuning

    candidates = [dict(n=0), dict(n=1), dict(n=2), dict(n=3)]
    launched, timed = [], []
    fake_ms = {0: [5.0, 1.0, 5.0], 2: [2.0, 2.0, 9.0], 3: [3.0, 3.0, 3.0]}

    def launch(cfg):
        if cfg["n"] == 1:
            raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")
        launched.append(cfg["n"])

    def stopwatch(fn):
        before = len(launched)
        fn()
        (n,) = launched[before:]
        timed.append(n)
        value = fake_ms[n][timed.count(n) - 1]
        return lambda: value

    times = tuning.time_candidates(launch, candidates, rounds=3, stopwatch=stopwatch)
    assert times == [5.0, math.inf, 2.0, 3.0]
    assert launched[:6] == [0, 0, 2, 2, 3, 3]
    assert timed == [0, 2, 3, 2, 3, 0, 3, 0, 2]
    with pytest.raises(ValueError):  # errors other than resource limits are not swallowed
        tuning.time_candidates(lambda cfg: (_ for _ in ()).throw(ValueError("bug")), candidates, stopwatch=stopwatch)


def test_candidates_are_compiled_at_once_before_timing(monkeypatch, tmp_path):
    """``compile_concurrently`` calls every candidate's launch once in compile-only mode, with Triton's compiles on
    ``HETERMOE_COMPILE_THREADS`` threads (1: none of this, each compiles at its first timed launch); a candidate that
    would tune something of its own first is skipped there (a nested ``select`` refuses to measure launches that run
    nothing), and any other failure is left to the timed launches."""
    from hf_hetermoe import env
    from hf_hetermoe.kernels import launch, tuning

    monkeypatch.setenv("HETERMOE_CACHE_DIR", str(tmp_path))
    tuning.clear()
    candidates = [dict(n=0), dict(n=1), dict(n=2)]
    seen = []

    def run(cfg):
        seen.append((cfg["n"], launch.compiling_only()))
        if cfg["n"] == 1:  # a candidate whose own kernel is not tuned yet
            tuning.select("nested", candidates, lambda cands: pytest.fail("measured while compiling only"))
        if cfg["n"] == 2:
            raise RuntimeError("a compile error: raised again at the timed launch")

    monkeypatch.setenv("HETERMOE_COMPILE_THREADS", "2")
    assert env.compile_threads() == 2
    tuning.compile_concurrently(run, candidates)
    assert seen == [(0, True), (1, True), (2, True)]  # each tried once; the skip and the error pass quietly
    assert not launch.compiling_only()
    tuning.select("nested", candidates, lambda cands: [1.0, 2.0, 3.0])  # tuned now: found while compiling only
    with launch.compile_only():
        assert tuning.select("nested", candidates, lambda cands: pytest.fail("tuned again")) == dict(n=0)
    seen.clear()
    monkeypatch.setenv("HETERMOE_COMPILE_THREADS", "1")
    tuning.compile_concurrently(run, candidates)
    assert not seen
    monkeypatch.setenv("HETERMOE_COMPILE_THREADS", "0")
    with pytest.raises(ValueError, match="HETERMOE_COMPILE_THREADS"):
        env.compile_threads()
    monkeypatch.delenv("HETERMOE_COMPILE_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert env.compile_threads() >= 1  # this node's CPUs shared by its ranks, at least one each
    tuning.clear()


def test_launch_decisions_are_remembered_per_signature(monkeypatch):
    """A launcher decides once per key on CUDA (the host time of deciding again left the GPU waiting at 4 K tokens),
    never while a CUDA graph is captured nor off CUDA, and forgets on ``clear`` / ``set_autotune``. The key holds the
    toggles, so changing one decides again."""
    from hf_hetermoe import env
    from hf_hetermoe.kernels import tuning

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    decided = []

    def decide(value):
        def run():
            decided.append(value)
            return value

        return run

    key = ("op", (4, 8), env.toggles())
    assert tuning.remembered(key, decide("a"), cuda) == "a"
    assert tuning.remembered(key, decide("b"), cuda) == "a"  # remembered: not decided again
    monkeypatch.setenv("HETERMOE_GLUON", "0")
    assert tuning.remembered(("op", (4, 8), env.toggles()), decide("c"), cuda) == "c"  # a toggle changed
    assert tuning.remembered(("cpu",), decide("d"), cpu) == "d"
    assert tuning.remembered(("cpu",), decide("e"), cpu) == "e"  # off CUDA: decided every time
    capturing[0] = True
    assert tuning.remembered(("graph",), decide("f"), cuda) == "f"
    capturing[0] = False
    assert tuning.remembered(("graph",), decide("g"), cuda) == "g"  # the capture's default was not kept
    tuning.set_autotune(False)
    assert tuning.remembered(key, decide("h"), cuda) == "h"
    tuning.set_autotune(None)
    tuning.clear()
    assert tuning.remembered(key, decide("i"), cuda) == "i"
    assert decided == ["a", "c", "d", "e", "f", "g", "h", "i"]
    tuning.clear()


def test_tuning_switches_and_buckets(monkeypatch):
    from hf_hetermoe.kernels import tuning

    monkeypatch.setenv("HETERMOE_AUTOTUNE", "0")
    assert not tuning.autotune_enabled()
    tuning.set_autotune(True)
    assert tuning.autotune_enabled()
    tuning.set_autotune(None)
    monkeypatch.setenv("HETERMOE_AUTOTUNE", "1")
    assert tuning.autotune_enabled()
    assert [tuning.bucket(n) for n in (0, 1, 3, 4, 5, 16384, 16385)] == [0, 1, 4, 4, 8, 16384, 32768]
    # CPU tensors never tune: the interpreter runs one small configuration.
    cpu = torch.device("cpu")
    cfg = tuning.choose("wgrad", ("x",), tuning.WGRAD_CANDIDATES, lambda c: pytest.fail("tuned"), device=cpu)
    assert cfg == tuning.INTERPRETER["wgrad"]
    # Stages, then the widest tile, shrink to fit shared memory.
    big = dict(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, GROUP_M=8)
    fitted = tuning.fit("gemm", big, 160 * 1024, block_m=128, num_b=2, elem=2)
    assert tuning.operand_bytes("gemm", fitted, 128, 2, 2) <= 160 * 1024
    assert fitted["num_stages"] == 2 and fitted["BLOCK_N"] == 256
    assert tuning.fit("gemm", big, 10**9, block_m=128, num_b=2) == big


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("vendor", [False, True], ids=["triton_wgrad", "vendor_wgrad_gu_released"])
def test_second_backward_through_one_graph_raises(vendor, monkeypatch):
    """The backward reuses the saved pre-activations' memory (and with the vendor weight gradients frees it before
    dW2): a second backward must fail loudly, not silently."""
    if vendor:
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("this torch has no _grouped_mm")
        monkeypatch.setattr(_triton_ops(), "vendor_wgrad_ok", lambda *tensors, toggles=None: True)
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(9, 16, 16, 3, 2, layout, torch.float32, DEVICE)
    w1.requires_grad_()
    loss = moe_experts(x, index, weights, w1, w2, layout=layout, backend="triton").square().sum()
    (first,) = torch.autograd.grad(loss, [w1], retain_graph=True)
    (want,) = torch.autograd.grad(
        moe_experts(x, index, weights, w1, w2, layout=layout, backend="reference").square().sum(), [w1]
    )
    assert rel_err(first, want) < 1e-4
    with pytest.raises(RuntimeError, match="already backpropagated"):
        torch.autograd.grad(loss, [w1])


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("prefetch", [False, True])
def test_wgrad_variants_match_torch(prefetch):
    """Every weight-gradient variant (row gathers on A or B; index prefetch on or off) equals a per-expert matmul,
    including experts with no rows and runs that are not a multiple of the row step."""
    from hf_hetermoe.kernels import triton_ops, tuning

    T, N, K, E, k = 61, 24, 40, 7, 3
    index = torch.rand(T, E, device=DEVICE).topk(k, dim=-1).indices
    index[index == 2] = 3  # expert 2 gets no rows
    routing = build_routing(index, E, triton_ops.block_m_for(DEVICE))
    S = T * k
    if DEVICE.type == "cpu":
        config = dict(tuning.INTERPRETER["wgrad"], num_stages=3, PREFETCH=prefetch)
    else:  # fp32 operands: shrink the tiles to the device's shared memory
        limit = tuning.shared_memory_per_block(DEVICE)
        config = tuning.fit("wgrad", dict(tuning.WGRAD_CANDIDATES[-1], PREFETCH=prefetch), limit, elem=4)
    tokens = routing.order.long() // k
    for gather_a, gather_b in [(True, False), (False, True)]:
        a = torch.randn(T if gather_a else S, N, device=DEVICE)
        b = torch.randn(T if gather_b else S, K, device=DEVICE)
        out = torch.full((E, N, K), float("nan"), device=DEVICE)
        triton_ops.wgrad(a, b, routing, k, out, gather_a=gather_a, gather_b=gather_b, config=config)
        a_rows = a[tokens] if gather_a else a
        b_rows = b[tokens] if gather_b else b
        offsets = routing.offsets.tolist()
        want = torch.stack([a_rows[s:e].T @ b_rows[s:e] for s, e in zip(offsets[:-1], offsets[1:])])
        assert rel_err(out, want) < TOLERANCE[torch.float32]


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("release_gu", [False, True], ids=["keep_gu", "release_gu"])
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "transposed_gelu_tanh"])
def test_vendor_weight_gradients_match_reference(layout, release_gu, monkeypatch):
    """The weight gradients through ``torch._grouped_mm`` on gathered rows (the path taken for bf16 on sm_90) equal
    the reference, in each storage layout (concatenated, transposed + interleaved with biases), with empty experts.
    On CPU torch's own grouped matmul stands in for CUTLASS; the orientation and the gathers are what is tested."""
    triton_ops = _triton_ops()
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    layout = LAYOUTS[layout]
    monkeypatch.setattr(triton_ops, "vendor_wgrad_ok", lambda *tensors, toggles=None: True)
    dtype = KERNEL_DTYPES[-1]  # bf16 on a GPU; the interpreter computes bf16 wrongly, so fp16 on CPU
    T, H, I, E, k = 21, 32, 16, 6, 2
    inputs = make_inputs(T, H, I, E, k, layout, dtype, DEVICE)
    inputs[1][inputs[1] == 4] = 5  # expert 4 gets no rows
    block_m = triton_ops.block_m_for(DEVICE)
    routing = build_routing(inputs[1], E, block_m)
    dout = torch.randn(T, H, device=DEVICE).to(dtype)
    _, _, grads_t = _fwd_bwd(triton_ops, inputs, layout, routing, dout, block_m, release_gu)
    _, _, grads_r = _fwd_bwd(ref, inputs, layout, routing, dout)
    for name, g_t, g_r in zip(["dx", "d_top_k_weights", "dw1", "dw2", "db1", "db2"], grads_t, grads_r):
        if g_r is None:
            assert g_t is None, name
            continue
        assert g_t.shape == g_r.shape and g_t.stride() == g_r.stride(), name
        assert rel_err(g_t, g_r) < TOLERANCE[dtype], name


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("release_gu", [False, True], ids=["keep_gu", "release_gu"])
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss", "transposed_gelu_tanh"])
def test_backward_g_on_sorted_rows_matches_reference(layout, release_gu, monkeypatch):
    """The backward's first matmul on ``dout``'s rows copied to sorted order (the copy then feeds dW2, which moves
    first) equals the reference in each storage layout, with an expert that gets no rows; and the path is offered
    only where ``E * H <= S``."""
    triton_ops = _triton_ops()
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    from hf_hetermoe.kernels import tuning

    layout = LAYOUTS[layout]
    asked = []
    monkeypatch.setattr(triton_ops, "vendor_wgrad_ok", lambda *tensors, toggles=None: True)
    monkeypatch.setattr(triton_ops, "SORTED_G_MIN_ROWS", 0)

    def take_sorted_rows(kernel, key, candidates, run, *, device, default, warm=None):
        asked.append(kernel)
        return next(c for c in candidates if c["IMPL"] == "sorted_rows") if kernel == "backward_g" else default

    monkeypatch.setattr(tuning, "choose_impl", take_sorted_rows)
    made, copy_rows = [], triton_ops.sorted_rows

    def counted_copy(src, *args):
        made.append(src.data_ptr())
        return copy_rows(src, *args)

    monkeypatch.setattr(triton_ops, "sorted_rows", counted_copy)
    dtype = KERNEL_DTYPES[-1]  # bf16 on a GPU; the interpreter computes bf16 wrongly, so fp16 on CPU
    block_m = triton_ops.block_m_for(DEVICE)
    for T, H, E, offered in [(40, 16, 3, True), (21, 32, 6, False)]:  # E * H <= T * k, then E * H > T * k
        asked.clear()
        made.clear()
        inputs = make_inputs(T, H, 16, E, 2, layout, dtype, DEVICE)
        inputs[1][inputs[1] == 1] = 2  # expert 1 gets no rows
        routing = build_routing(inputs[1], E, block_m)
        dout = torch.randn(T, H, device=DEVICE).to(dtype)
        _, _, grads_t = _fwd_bwd(triton_ops, inputs, layout, routing, dout, block_m, release_gu)
        _, _, grads_r = _fwd_bwd(ref, inputs, layout, routing, dout)
        assert asked.count("backward_g") == int(offered)
        assert made.count(dout.data_ptr()) == 1  # dout's rows copied once, for g and dW2 alike (or for dW2 alone)
        for name, g_t, g_r in zip(["dx", "d_top_k_weights", "dw1", "dw2", "db1", "db2"], grads_t, grads_r):
            if g_r is None:
                assert g_t is None, name
                continue
            assert rel_err(g_t, g_r) < TOLERANCE[dtype], name


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("layout", ["mixtral", "gpt_oss_no_bias", "transposed_gelu_tanh"])
def test_vendor_sorted_matmuls_match_reference(layout, monkeypatch):
    """Gate/up (then the activation pass), the down projection and dx through ``torch._grouped_mm`` (taken where the
    tuner measured CUTLASS faster) equal the reference in each weight storage layout, with an expert that gets no
    rows. On CPU torch's own grouped matmul stands in for CUTLASS; the operand orientation is what is tested."""
    triton_ops = _triton_ops()
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    from hf_hetermoe.kernels import tuning

    layout_name, layout = layout, LAYOUTS[layout.replace("_no_bias", "")]
    calls = []
    monkeypatch.setattr(triton_ops, "vendor_matmul_ok", lambda a, b, toggles=None: True)

    def take_cutlass(kernel, key, candidates, run, *, device, default, warm=None):
        calls.append(kernel)  # on sm_90 the weight gradients ask too (Gluon or CUTLASS)
        return next(c for c in candidates if c["IMPL"] == "cutlass")

    monkeypatch.setattr(tuning, "choose_impl", take_cutlass)
    monkeypatch.setattr(triton_ops, "VENDOR_GATE_UP_MIN_ROWS", 0)  # offered at any rows per expert here
    dtype = KERNEL_DTYPES[-1]  # bf16 on a GPU; the interpreter computes bf16 wrongly, so fp16 on CPU
    T, H, I, E, k = 19, 32, 16, 5, 2
    inputs = list(make_inputs(T, H, I, E, k, layout, dtype, DEVICE))
    if layout_name.endswith("_no_bias"):
        inputs[5] = inputs[6] = None  # the vendor down projection takes no bias
    inputs[1][inputs[1] == 3] = 4  # expert 3 gets no rows
    block_m = triton_ops.block_m_for(DEVICE)
    routing = build_routing(inputs[1], E, block_m)
    dout = torch.randn(T, H, device=DEVICE).to(dtype)
    out_t, _, grads_t = _fwd_bwd(triton_ops, inputs, layout, routing, dout, block_m)
    out_r, _, grads_r = _fwd_bwd(ref, inputs, layout, routing, dout)
    assert calls.count("sorted_matmul") == 2  # the down projection and dx
    # Gate/up through CUTLASS and the activation pass, where there is no bias.
    assert calls.count("gate_up") == (1 if inputs[5] is None else 0)
    assert rel_err(out_t, out_r) < TOLERANCE[dtype]
    for name, g_t, g_r in zip(["dx", "d_top_k_weights", "dw1", "dw2", "db1", "db2"], grads_t, grads_r):
        if g_r is None:
            assert g_t is None, name
            continue
        assert rel_err(g_t, g_r) < TOLERANCE[dtype], name


@requires_triton
@pytest.mark.triton_interpret
def test_sorted_matmul_is_triton_off_cuda(monkeypatch):
    """Off CUDA (and so in CI) the sorted-row matmuls run our Triton kernel: never the vendor's, whatever it
    would take, and never the Gluon kernel (sm_90 only)."""
    triton_ops = _triton_ops()

    def fail(*args, **kwargs):
        raise AssertionError("the vendor kernel never runs off CUDA")

    monkeypatch.setattr(triton_ops, "vendor_matmul_ok", lambda a, b, toggles=None: True)
    monkeypatch.setattr(torch, "_grouped_mm", fail, raising=False)
    dtype = KERNEL_DTYPES[-1]
    num_pairs, k, n, num_experts = 40, 32, 48, 3
    index = torch.randint(0, num_experts, (num_pairs, 1), device=DEVICE)
    block_m = triton_ops.block_m_for(torch.device(DEVICE))
    routing = build_routing(index, num_experts, block_m)
    a = torch.randn(num_pairs, k, device=DEVICE).to(dtype)
    b = torch.randn(num_experts, n, k, device=DEVICE).to(dtype)
    out = triton_ops.sorted_matmul(a, b, routing, 1, block_m=block_m)
    bounds = routing.offsets.tolist()
    want = torch.cat([a[s:t].float() @ b[e].float().T for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:]))])
    assert rel_err(out, want) < TOLERANCE[dtype]


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("persistent", ["0", "1"], ids=["one_program_per_tile", "persistent"])
def test_half_height_tail_tiles_match_full_tiles(persistent, monkeypatch):
    """An expert's last tile of at most half the rows runs at half height: same result as the full-height tile,
    with tiles of both kinds present, in both kernels."""
    monkeypatch.setenv("HETERMOE_PERSISTENT", persistent)
    triton_ops = _triton_ops()
    layout = LAYOUTS["mixtral"]
    block_m = triton_ops.block_m_for(DEVICE)
    T, H, I, E, k = block_m * 9 // 5, 16, 24, 3, 2  # ~1.2 row tiles per expert: full tiles and short tails
    inputs = make_inputs(T, H, I, E, k, layout, torch.float32, DEVICE)
    routing = build_routing(inputs[1], E, block_m)
    used = routing.tile_expert < E
    ends = routing.offsets[1:][routing.tile_expert[used].long()]
    rows = torch.minimum(ends - routing.tile_start[used], torch.tensor(block_m))
    assert (rows <= block_m // 2).any() and (rows > block_m // 2).any()
    dout = torch.randn(T, H, device=DEVICE)
    results = {}
    for split in ("1", "0"):
        monkeypatch.setenv("HETERMOE_SPLIT_TAIL", split)
        results[split] = _fwd_bwd(triton_ops, inputs, layout, routing, dout, block_m)
    (out1, gu1, grads1), (out0, gu0, grads0) = results["1"], results["0"]
    assert rel_err(out1, out0) < 1e-6 and rel_err(gu1, gu0) < 1e-6
    for g1, g0 in zip(grads1, grads0):
        assert (g1 is None) == (g0 is None)
        if g1 is not None:
            assert rel_err(g1, g0) < 1e-6


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("one_dot", ["1", "0"], ids=["one_dot", "two_dots"])
@pytest.mark.parametrize(
    "layout",
    [ExpertLayout(has_bias=True), ExpertLayout(is_transposed=True, activation="gelu_tanh")],
    ids=["concatenated_bias", "transposed"],
)
def test_gate_up_one_dot_and_two_dots_match_reference(layout, one_dot, monkeypatch):
    """Concatenated gate/up in one interleaved dot (default) or two dots: both equal the reference."""
    monkeypatch.setenv("HETERMOE_ONE_DOT_GATE_UP", one_dot)
    _check_triton_vs_reference((19, 24, 20, 5, 2, "random"), layout, torch.float32)


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "shape, layout",
    [
        (EDGE_SHAPES["full_and_tail_tiles"], "mixtral"),
        (EDGE_SHAPES["empty_experts"], "mixtral"),
        ((37, 33, 19, 7, 3, "random"), "gpt_oss"),
        ((19, 24, 20, 5, 2, "random"), "transposed_gelu_tanh"),
    ],
    ids=["full_and_tail_tiles", "empty_experts", "gpt_oss_odd", "transposed"],
)
def test_persistent_gathered_matmuls_match_reference(shape, layout, monkeypatch):
    """HETERMOE_PERSISTENT=1: every gathered matmul from a few programs that each walk several (row tile, N tile)
    pairs, skipping the unused tile slots, equals the reference (gated one-dot, paired, plain, gathered or not)."""
    monkeypatch.setenv("HETERMOE_PERSISTENT", "1")
    _check_triton_vs_reference(shape, LAYOUTS[layout], torch.float32)


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("T, N, E, k", [(13, 70, 5, 3), (6, 16, 4, 4), (0, 16, 3, 2)], ids=["odd", "k=E", "no_tokens"])
def test_sorted_rows_equal_the_sorted_gather(T, N, E, k):
    """The vendor weight gradients' operands: token rows written in token order to their k sorted positions equal
    ``src[order // k]`` (bit for bit: a copy), with a strided source."""
    triton_ops = _triton_ops()
    index = torch.rand(T, E, device=DEVICE).topk(k, dim=-1).indices
    routing = build_routing(index, E, triton_ops.block_m_for(DEVICE))
    src = torch.randn(N, T, device=DEVICE).t()  # column-major rows
    got = triton_ops.sorted_rows(src, routing, k)
    assert got.shape == (T * k, N)
    assert torch.equal(got, src[routing.order.long() // k])


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_combine_weights_and_adds_the_down_bias(bias):
    """``combine``: each token's k rows, each plus its expert's down-projection bias, weighted and summed in fp32."""
    triton_ops = _triton_ops()
    T, N, E, k = 11, 70, 5, 3
    index = torch.rand(T, E, device=DEVICE).topk(k, dim=-1).indices
    routing = build_routing(index, E, triton_ops.block_m_for(DEVICE))
    y = torch.randn(T * k, N, device=DEVICE)
    weights = torch.softmax(torch.randn(T, k, device=DEVICE), -1)
    b2 = torch.randn(E, N, device=DEVICE) if bias else None
    got = triton_ops.combine(y, routing, weights, T, k, bias=b2)
    rows = y[routing.inverse.long()].reshape(T, k, N)  # pair t*k + j's row
    if bias:
        rows = rows + b2[index]
    assert torch.allclose(got, (weights[..., None] * rows).sum(1), atol=1e-5, rtol=1e-5)


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("gather, scale", [(False, False), (True, True)], ids=["sorted_rows", "token_rows_scaled"])
def test_expert_colsum_is_each_experts_column_sum(gather, scale):
    """The bias gradients: per expert, the column sums of its rows (sorted ones, or token rows gathered and scaled
    by each pair's routing weight), with empty experts summing to zero."""
    triton_ops = _triton_ops()
    T, N, E, k = 40, 150, 7, 2  # experts of several row tiles, some empty
    index = (torch.rand(T, E, device=DEVICE) * torch.tensor([1.0] * 5 + [0.0] * 2, device=DEVICE)).topk(k, -1).indices
    routing = build_routing(index, E, triton_ops.block_m_for(DEVICE))
    a = torch.randn(T if gather else T * k, N, device=DEVICE)
    w = torch.rand(T * k, device=DEVICE)
    out = torch.empty(E, N, device=DEVICE)
    triton_ops.expert_colsum(a, routing, k, out, gather_a=gather, scale=w if scale else None)
    order = routing.order.long()
    rows = a[order // k] if gather else a
    if scale:
        rows = rows * w[order][:, None]
    want = torch.zeros(E, N, device=DEVICE).index_add_(0, routing.expert.long(), rows)
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-5)
    assert torch.count_nonzero(out[5:]) == 0

"""Tests that need a CUDA device (skipped elsewhere): the compiled Triton kernels in bf16, a prepared model
on the GPU, CUDA-graph capture (no host synchronisation) and torch.compile with inductor."""

import copy

import pytest
import torch
from _moe_inputs import LAYOUTS, make_inputs
from conftest import TOLERANCE, enable_checkpointing, rel_err

import hf_hetermoe as hetermoe
from hf_hetermoe.kernels import build_routing, moe_experts
from hf_hetermoe.kernels import reference as ref

pytestmark = pytest.mark.gpu


# Every layout in bf16; fp16 and fp32 on the default layout (each (dtype, layout) pair compiles its own kernels),
# on one shape; odd sizes (unaligned strides: other kernel specialisations) and a larger k on two layouts only.
DTYPE_LAYOUTS = [(torch.bfloat16, n) for n in LAYOUTS] + [(torch.float16, "mixtral"), (torch.float32, "mixtral")]
EXTRA_SHAPES = ((77, 136, 72, 7, 2), (2048, 512, 256, 8, 8))
CASES = [(d, n, (1000, 256, 192, 16, 4)) for d, n in DTYPE_LAYOUTS] + [
    (torch.bfloat16, n, shape) for n in ("mixtral", "gpt_oss") for shape in EXTRA_SHAPES
]
CASE_IDS = [f"{d}-{n}-{'x'.join(map(str, s))}".replace("torch.", "") for d, n, s in CASES]


@pytest.mark.parametrize("dtype,layout,shape", CASES, ids=CASE_IDS)
def test_triton_bf16_matches_reference_on_gpu(layout, dtype, shape):
    from hf_hetermoe.kernels import triton_ops

    T, H, I, E, k = shape
    layout_ = LAYOUTS[layout]
    inputs = make_inputs(T, H, I, E, k, layout_, dtype, "cuda")
    block_m = triton_ops.block_m_for(torch.device("cuda"))
    routing = build_routing(inputs[1], E, block_m)
    x, index, weights, w1, w2, b1, b2 = inputs
    dout = torch.randn(T, H, device="cuda").to(dtype)
    out_t, gu_t = triton_ops.experts_forward(x, w1, w2, b1, b2, weights, routing, layout_, block_m)
    out_r, gu_r = ref.experts_forward(x, w1, w2, b1, b2, weights, routing, layout_)
    tol = TOLERANCE[dtype] * (1 if dtype != torch.float32 else 5)
    assert rel_err(out_t, out_r) < tol
    grads_t = triton_ops.experts_backward(dout, x, w1, w2, b1, b2, weights, routing, gu_t, layout_, block_m)
    grads_r = ref.experts_backward(dout, x, w1, w2, b1, b2, weights, routing, gu_r, layout_)
    for name, g_t, g_r in zip(["dx", "dweights", "dw1", "dw2", "db1", "db2"], grads_t, grads_r):
        if g_r is not None:
            assert rel_err(g_t, g_r) < tol, name


def test_toggle_changed_between_calls_takes_effect(monkeypatch):
    """Launch decisions are remembered per call signature (``tuning.remembered``), the toggles part of it: turning the
    Gluon row matmuls off between two calls of the same layer keeps them out of the second, and back on, in again."""
    from hf_hetermoe.kernels import gluon_gemm

    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(512, 128, 64, 4, 2, layout, torch.bfloat16, "cuda")
    if not gluon_gemm.available(x):
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    calls = []
    real = gluon_gemm.sorted_matmul

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gluon_gemm, "sorted_matmul", counted)

    def forward():
        with torch.no_grad():
            return moe_experts(x, index, weights, w1, w2, layout=layout)

    first = forward()  # pinned defaults: Gluon for the down projection at 256 rows per expert
    assert len(calls) == 1
    monkeypatch.setenv("HETERMOE_GLUON_GEMM", "0")
    off = forward()
    assert len(calls) == 1
    monkeypatch.delenv("HETERMOE_GLUON_GEMM")
    again = forward()
    assert len(calls) == 2
    assert torch.equal(first, again)
    assert rel_err(off, first) < TOLERANCE[torch.bfloat16]


def test_backward_peak_memory_bound():
    """Peak extra memory of forward+backward: the returned gradients, the saved pre-activations (whose storage the
    backward reuses for their gradient) and one transient [S, max(H, I)] buffer; no zero-filled gradient for the
    saved tensor, no second [S, N1] buffer."""
    layout = LAYOUTS["mixtral"]
    T, H, I, E, k = 2048, 512, 1024, 8, 2
    x, index, weights, w1, w2, _, _ = make_inputs(T, H, I, E, k, layout, torch.bfloat16, "cuda")
    leaves = [t.requires_grad_() for t in (x, weights, w1, w2)]
    dout = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the first call compiles
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = moe_experts(x, index, weights, w1, w2, layout=layout, backend="triton")
        grads = torch.autograd.grad(out, leaves, dout)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out, grads
    S, elem = T * k, 2
    returned = (T * H + 3 * E * H * I) * elem + T * k * 4
    bound = returned + S * 2 * I * elem + S * max(H, I) * elem + T * H * elem + 2**20
    assert peak <= bound, f"peak extra {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"


def test_prepared_qwen3_moe_bf16_on_gpu():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
    )
    base = AutoModelForCausalLM.from_config(config, experts_implementation="eager").to("cuda", torch.bfloat16)
    prepared = hetermoe.prepare(copy.deepcopy(base))
    truth = copy.deepcopy(base).float()  # fp32 twin: the scale of bf16 rounding error
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    models = (base, prepared, truth)
    with torch.no_grad():  # logits from evaluation mode: the prepared training forward returns none (fused loss)
        want, got, exact = [m.eval()(ids).logits.float() for m in models]
    # hetermoe in bf16 must sit as close to eager bf16 as eager bf16 sits to fp32 (within 2x, plus a floor)
    assert rel_err(got, want) < 2 * rel_err(want, exact) + 1e-3
    losses = []
    for m in models:
        loss = m.train()(ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        losses.append(loss.item())
    want, got, exact = losses
    assert abs(got - want) < 2 * abs(want - exact) + 1e-3 * abs(exact)
    params = zip(prepared.named_parameters(), base.named_parameters(), truth.named_parameters())
    for (name, p), (_, q), (_, r) in params:
        scale = rel_err(q.grad.float(), r.grad)
        assert rel_err(p.grad.float(), q.grad.float()) < 2 * scale + 1e-3, name


@pytest.mark.parametrize("calling_thread", [False, True], ids=["worker_thread", "calling_thread"])
def test_backward_thread_follows_backward_on_calling_thread(calling_thread):
    """``HeterMoEConfig.backward_on_calling_thread``: the experts' backward (a tensor hook on their output runs
    where their backward node runs) is on the thread that called ``loss.backward()``, or on autograd's CUDA worker
    thread without it; the experts' gradients are the same either way."""
    import threading

    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
    )
    base = AutoModelForCausalLM.from_config(config, experts_implementation="eager").to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    grads = []
    # PyTorch's own default may become the calling thread (pytorch/pytorch#192082): then both cases run there.
    worker_by_default = torch._C._is_multithreading_enabled()
    for on in (False, calling_thread):
        model = hetermoe.prepare(copy.deepcopy(base), hetermoe.HeterMoEConfig(backward_on_calling_thread=on))
        experts = next(m for m in model.modules() if hasattr(m, "_hetermoe_layout"))
        threads = []

        def record_backward_thread(module, args, out):
            # A forward hook that returns something replaces the module's output: this one returns None.
            out.register_hook(lambda grad: threads.append(threading.get_ident()))

        handle = experts.register_forward_hook(record_backward_thread)
        model.train()(ids, labels=ids).loss.backward()
        handle.remove()
        assert threads and all(t == threading.get_ident() for t in threads) is (on or not worker_by_default)
        # The experts' weights (one layer: their gradient flows from the head, not through attention's backward,
        # which may accumulate with atomics): the same kernels in the same order, the same bits.
        grads.append([p.grad for p in experts.parameters()])
        hetermoe.unprepare(model)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "use_reentrant, offload", [(False, False), (False, True), (True, False)], ids=["on_device", "offload", "reentrant"]
)
def test_activation_checkpointing_in_bf16_on_gpu(use_reentrant, offload):
    """The bf16 GPU path (vendor weight gradients, the saved pre-activations freed inside the backward) under
    activation checkpointing: the recomputed forward's tensors feed the experts' backward, and the gradients equal
    the same prepared model's without checkpointing (same kernels, deterministic: only the recompute differs).
    Reentrant checkpoints run a backward inside the backward: with ``prepare``'s default both run on the calling
    thread (``HeterMoEConfig.backward_on_calling_thread``), not on autograd's CUDA worker."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
    )
    base = AutoModelForCausalLM.from_config(config, experts_implementation="eager").to("cuda", torch.bfloat16)
    plain = hetermoe.prepare(base)
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed, use_reentrant=use_reentrant, offload=offload)
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    losses = []
    for m in (plain, checkpointed):
        loss = m.train()(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-3 * abs(losses[0])
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert rel_err(q.grad.float(), p.grad.float()) < 1e-2, name


def test_training_step_captures_in_a_cuda_graph():
    """No host synchronisation in forward or backward: the whole experts step captures in a CUDA graph."""
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(512, 256, 128, 8, 2, layout, torch.bfloat16, "cuda")
    w1.requires_grad_()
    w2.requires_grad_()

    def step():
        out = moe_experts(x, index, weights, w1, w2, layout=layout, backend="triton")
        gw1, gw2 = torch.autograd.grad(out.float().square().sum(), [w1, w2])
        return out, gw1, gw2

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    index.copy_(torch.rand(512, 8, device="cuda").topk(2, dim=-1).indices)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static, eager):
        assert rel_err(a.float(), b.float()) < 1e-3


def test_torch_compile_fullgraph_inductor():
    layout = LAYOUTS["mixtral"]
    x, index, weights, w1, w2, _, _ = make_inputs(256, 128, 64, 8, 2, layout, torch.bfloat16, "cuda")
    w1.requires_grad_()

    def loss_fn(x, index, weights, w1, w2):
        return moe_experts(x, index, weights, w1, w2, layout=layout, backend="triton").float().square().mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    (g_c,) = torch.autograd.grad(compiled(x, index, weights, w1, w2), [w1])
    (g_e,) = torch.autograd.grad(loss_fn(x, index, weights, w1, w2), [w1])
    assert rel_err(g_c.float(), g_e.float()) < 1e-2


def test_autotuned_kernels_match_reference_and_cache(tmp_path, monkeypatch):
    """With autotuning on, the first call times the candidates, caches the choices on disk, and stays correct.
    The weight gradients are pinned to Triton (bf16 on sm_90 would otherwise take torch._grouped_mm), so both
    tuned kernel families are exercised, and dx's choice between Triton and torch._grouped_mm is tuned too."""
    import json

    from hf_hetermoe.kernels import tuning

    monkeypatch.setenv("HETERMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HETERMOE_VENDOR_WGRAD", "0")
    tuning.clear()
    tuning.set_autotune(True)
    try:
        layout = LAYOUTS["gpt_oss"]
        x, index, weights, w1, w2, b1, b2 = make_inputs(600, 256, 192, 8, 2, layout, torch.bfloat16, "cuda")
        leaves = [t.requires_grad_() for t in (x, weights, w1, w2, b1, b2)]
        out = moe_experts(x, index, weights, w1, w2, b1, b2, layout=layout, backend="triton")
        got = torch.autograd.grad(out.float().square().sum(), leaves)
    finally:
        tuning.set_autotune(None)
        tuning.clear()
    exact = [t.detach().float().requires_grad_() for t in leaves]
    xe, we, w1e, w2e, b1e, b2e = exact
    expected = ref.experts_eager(xe, index, we, w1e, w2e, b1e, b2e, layout)
    assert rel_err(out.float(), expected) < TOLERANCE[torch.bfloat16]
    want = torch.autograd.grad(expected.square().sum(), exact)
    for g, w in zip(got, want):
        assert rel_err(g.float(), w.float()) < TOLERANCE[torch.bfloat16]
    cached = json.loads((tmp_path / "tuning.json").read_text())
    kinds = {name.split("|")[1] for name in cached}
    assert kinds == {"gemm", "wgrad", "sorted_matmul"}, cached


def test_zebra_engine_world_of_one_on_gpu():
    """The runtime on CUDA (NCCL world of one, CUDA events, the Triton experts): one R=2 step equals plain
    training of the prepared model in fp32."""
    import warnings

    from transformers import AutoModelForCausalLM, MixtralConfig

    from hf_hetermoe.runtime import zebra_plan

    cfg = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=0.02)
    torch.manual_seed(0)
    model = hetermoe.prepare(AutoModelForCausalLM.from_config(cfg))
    ref_model = copy.deepcopy(model).cuda()
    plan = zebra_plan(cfg, 1, 0, micro_batches=2, sequences_per_attention_rank=2, seq_len=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-3), watchdog=False,
                                     record_timeline=True)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    res = engine.train_step({"input_ids": ids})
    assert res.timeline and all(e["end_ms"] >= e["start_ms"] for e in res.timeline)
    opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3)
    want = 0.0
    for i in range(2):
        chunk = ids[i:i + 1].cuda()
        out = ref_model(input_ids=chunk, labels=chunk)
        (out.loss / 2).backward()
        want += float(out.loss) / 2
    opt.step()
    assert abs(res.loss - want) <= 1e-4 * abs(want)
    got, ref_sd = engine.state_dict(), ref_model.state_dict()
    for k in ref_sd:
        assert rel_err(got[k].float(), ref_sd[k].float().cpu()) < 1e-3, k
    engine.close()

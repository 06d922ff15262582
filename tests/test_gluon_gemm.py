"""The Gluon row matmul (``kernels/gluon_gemm.py``): compiled for Hopper on any machine (no GPU needed), which calls
may take it, and on an sm_90 GPU its results against an fp32 reference: gathered and sorted rows, K- and
N-contiguous weights, gated tiles with their activation, experts of 0, 1, 127, 128 and 129 rows, more tiles than
programs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_hetermoe.kernels import gluon_gemm
from hf_hetermoe.kernels.layout import ACTIVATIONS
from hf_hetermoe.kernels.routing import build_routing

requires_gluon = pytest.mark.skipif(not gluon_gemm._GLUON, reason="this Triton has no Gluon")
# The largest dynamic shared memory a program may opt into on an H100 / H200 (227 KiB).
HOPPER_SHARED_LIMIT = 232448
# (gather, gated, K-contiguous weight): gate/up, down, g and dx of an experts layer.
VARIANTS = [(True, True, True), (False, False, True), (True, False, False), (False, False, False)]


def _compile_for_hopper(cfg: dict, gather: bool, gated: bool, kmajor: bool):
    """``_gather_gemm_kernel`` compiled for sm_90 from CPU tensors (nothing is launched), specialised as the
    launcher's arguments would be (16-divisible pointers, strides and sizes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    e, n, k, s = 4, 256, 512, 1024
    a = torch.empty(s, k, dtype=torch.bfloat16)
    if kmajor:
        b = torch.empty(e, 2 * n if gated else n, k, dtype=torch.bfloat16)[:, :n]
    else:
        b = torch.empty(e, k, n, dtype=torch.bfloat16).transpose(1, 2)
    out = torch.empty(s, 2 * n if gated else n, dtype=torch.bfloat16)
    h = torch.empty(s, n, dtype=torch.bfloat16)
    i32 = torch.zeros(8, dtype=torch.int32)
    a_block = [cfg["BLOCK_M"], cfg["BLOCK_K"]]
    layout = gluon_gemm.gl.NVMMASharedLayout.get_default_for(a_block, gluon_gemm.gl.bfloat16)
    values = dict(
        a_ptr=a,
        a_desc=gluon_gemm.TensorDescriptor.from_tensor(a, a_block, layout),
        stride_am=k,
        order_ptr=i32,
        top_k=8,
        b_desc=gluon_gemm._b_descriptor(b, cfg, gated, n if gated else 0),
        c_ptr=out,
        c2_ptr=out,
        stride_cm=out.stride(0),
        h_ptr=h,
        stride_hm=n,
        tile_expert_ptr=i32,
        tile_start_ptr=i32,
        offsets_ptr=i32,
        num_experts=e,
        N=n,
        K=k,
        up_offset=n if gated else 0,
    )
    constants = dict(
        GATHER=gather,
        TMA_A=not gather,
        FENCE=True,
        LAG=cfg.get("LAG", 0),
        GATED=gated,
        B_KMAJOR=kmajor,
        ACT=0 if gated else -1,
        GROUP_M=cfg["GROUP_M"],
        E_POW2=e,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"] // (2 if gated else 1),
        BLOCK_K=cfg["BLOCK_K"],
        STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"],
    )
    fn = gluon_gemm._gather_gemm_kernel
    signature = {name: "constexpr" if name in constants else mangle_type(values[name]) for name in fn.arg_names}
    aligned = [n for n in values if n.endswith("_ptr") or n.startswith("stride") or n in ("N", "K")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = GluonASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}, attrs)
    options = dict(num_warps=4, maxnreg=cfg["MAXNREG"], enable_fp_fusion=True)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _compile_report() -> list[dict]:
    """Per configuration and variant: shared memory and which of the expected instructions the PTX holds."""
    report = []
    for cfg in gluon_gemm.CONFIGS:
        for variant in VARIANTS:
            ptx_kernel = _compile_for_hopper(cfg, *variant)
            ptx = ptx_kernel.asm["ptx"]
            wanted = ["wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg"]  # b (and sorted a) through TMA
            if variant[0]:  # gathered rows of a: 16-byte cp.async copies that arrive on the stage's barrier
                wanted += ["cp.async.cg.shared.global", "cp.async.mbarrier.arrive.noinc"]
            report.append(dict(shared=ptx_kernel.metadata.shared, missing=[i for i in wanted if i not in ptx]))
    return report


@requires_gluon
def test_compiles_for_hopper_without_a_gpu():
    """Every configuration and variant compiles for sm_90 with the installed Triton, fits an H100's shared memory,
    and is what it claims to be. In a fresh interpreter without TRITON_INTERPRET (see test_gluon_wgrad)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == len(gluon_gemm.CONFIGS) * len(VARIANTS)
    for item in report:
        assert item["shared"] <= HOPPER_SHARED_LIMIT, item
        assert not item["missing"], item


def test_not_taken_off_hopper_and_says_what_to_use():
    """CPU tensors (and so CI) never take the Gluon kernel; asking for it anyway names the Triton launcher."""
    a = torch.randn(64, 128, dtype=torch.bfloat16)
    b = torch.randn(2, 64, 128, dtype=torch.bfloat16)
    assert not gluon_gemm.supported(a, b)
    offsets = torch.tensor([0, 32, 64], dtype=torch.int32)
    tiles = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="triton_ops.gather_gemm"):
        gluon_gemm.gather_gemm(a, b, offsets, tiles, tiles, out=torch.empty(64, 64, dtype=torch.bfloat16))


def test_weight_majors():
    """Which storage order of the logical ``[E, N, K]`` weight TMA reads: K- or N-contiguous, 16-byte strides."""
    w = torch.empty(4, 64, 128, dtype=torch.bfloat16)
    assert gluon_gemm._b_major(w) == "k"
    assert gluon_gemm._b_major(w.transpose(1, 2)) == "n"
    assert gluon_gemm._b_major(torch.empty(4, 64, 130, dtype=torch.bfloat16)[..., :128]) is None


def _reference(a, b, b_up, routing, top_k, gather, act):
    order = routing.order.long().cpu()
    bounds = routing.offsets.tolist()
    rows = (order // top_k) if gather else torch.arange(order.numel())
    a_rows = a.float().cpu()[rows]
    outs = []
    for w in (b, b_up) if b_up is not None else (b,):
        out = torch.zeros(order.numel(), w.shape[1])
        for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])):
            out[s:t] = a_rows[s:t] @ w[e].float().cpu().T
        outs.append(out)
    if b_up is None:
        return outs[0], None, None
    gate, up = outs
    fns = {
        "silu": torch.nn.functional.silu,
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "relu": torch.relu,
    }
    return gate, up, fns[act](gate) * up


def _routing_with_counts(counts: list[int], top_k: int, device) -> tuple:
    """A routing whose experts receive exactly ``counts`` (token, slot) pairs (``sum(counts) = T * top_k``)."""
    num_experts = len(counts)
    slots = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    # Each token's k slots must name distinct experts: deal the sorted slots round-robin over the tokens.
    tokens = slots.numel() // top_k
    idx = slots.view(top_k, tokens).T.contiguous().to(device)
    return build_routing(idx, num_experts, 128), tokens


gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and gluon_gemm._GLUON and torch.cuda.get_device_capability()[0] == 9),
    reason="needs an sm_90 GPU",
)


@gpu
@pytest.mark.parametrize("config", range(len(gluon_gemm.CONFIGS)))
@pytest.mark.parametrize("gather,gated,kmajor", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_on_gpu(config, gather, gated, kmajor, dtype):
    torch.manual_seed(0)
    top_k = 2
    counts = [0, 1, 127, 128, 129, 300, 0, 83]  # 768 pairs, 384 tokens
    routing, tokens = _routing_with_counts(counts, top_k, "cuda")
    n, k = 200, 208  # neither a multiple of the tiles
    num_experts = len(counts)
    a = torch.randn(tokens if gather else tokens * top_k, k, device="cuda", dtype=dtype)
    act = "silu" if config == 0 else "gelu_tanh"
    if kmajor:
        w = torch.randn(num_experts, 2 * n if gated else n, k, device="cuda", dtype=dtype) / k**0.5
        b, b_up = w[:, :n], (w[:, n:] if gated else None)
    else:
        b = (torch.randn(num_experts, k, n, device="cuda", dtype=dtype) / k**0.5).transpose(1, 2)
        b_up = None
    out = torch.full((tokens * top_k, 2 * n if gated else n), float("nan"), device="cuda", dtype=dtype)
    h = torch.full((tokens * top_k, n), float("nan"), device="cuda", dtype=dtype) if gated else None
    gluon_gemm.gather_gemm(
        a,
        b,
        routing.offsets,
        routing.tile_expert,
        routing.tile_start,
        order=routing.order if gather else None,
        top_k=top_k,
        b_up=b_up,
        out=out[:, :n],
        out_up=out[:, n:] if gated else None,
        act_out=h,
        act=ACTIVATIONS[act] if gated else -1,
        config=gluon_gemm.CONFIGS[config],
        num_programs=3,  # each program walks many tiles, both consumers take several turns
    )
    torch.cuda.synchronize()
    gate, up, act_ref = _reference(a, b, b_up, routing, top_k, gather, act)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(out[:, :n].float().cpu(), gate, **tol)
    if gated:
        torch.testing.assert_close(out[:, n:].float().cpu(), up, **tol)
        torch.testing.assert_close(h.float().cpu(), act_ref, **tol)


@gpu
def test_many_tiles_all_programs():
    """A Qwen3-sized gate/up call on every SM: the ring's barriers wrap many times."""
    torch.manual_seed(1)
    top_k, num_experts, hidden, inter = 8, 16, 512, 192
    tokens = 2048
    idx = torch.rand(tokens, num_experts, device="cuda").topk(top_k, dim=1).indices
    routing = build_routing(idx, num_experts, 128)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    out = torch.empty(tokens * top_k, 2 * inter, device="cuda", dtype=torch.bfloat16)
    h = torch.empty(tokens * top_k, inter, device="cuda", dtype=torch.bfloat16)
    gluon_gemm.gather_gemm(
        x,
        w[:, :inter],
        routing.offsets,
        routing.tile_expert,
        routing.tile_start,
        order=routing.order,
        top_k=top_k,
        b_up=w[:, inter:],
        out=out[:, :inter],
        out_up=out[:, inter:],
        act_out=h,
        act=0,
    )
    gate, up, act_ref = _reference(x, w[:, :inter], w[:, inter:], routing, top_k, True, "silu")
    torch.testing.assert_close(h.float().cpu(), act_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:, :inter].float().cpu(), gate, atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    print(json.dumps(_compile_report()))

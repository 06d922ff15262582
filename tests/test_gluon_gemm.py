"""The Gluon matmul of sorted rows (``kernels/gluon_gemm.py``): compiled for Hopper on any machine (no GPU needed),
refused off Hopper, and on an sm_90 GPU its results against an fp32 reference: K- and N-contiguous weights, experts
of 0, 1, 127, 128 and 129 rows, more tiles than programs."""

import json

import pytest
import torch
from _gluon_compile import HOPPER_SHARED_LIMIT, compile_for_hopper, compile_report_in_child, hopper_report

from hf_hetermoe.kernels import gluon_gemm
from hf_hetermoe.kernels.routing import build_routing

requires_gluon = pytest.mark.skipif(not gluon_gemm._GLUON, reason="this Triton has no Gluon")


def _compile_for_hopper(cfg: dict, kmajor: bool):
    """``_sorted_matmul_kernel`` compiled for sm_90 from CPU tensors (nothing is launched), specialised as the
    launcher's arguments would be (16-divisible pointers, strides and sizes)."""
    e, n, k, s = 4, 256, 512, 1024
    a = torch.empty(s, k, dtype=torch.bfloat16)
    b = torch.empty(e, n, k, dtype=torch.bfloat16) if kmajor else torch.empty(e, k, n, dtype=torch.bfloat16).mT
    out = torch.empty(s, n, dtype=torch.bfloat16)
    i32 = torch.zeros(8, dtype=torch.int32)
    a_desc, b_desc = gluon_gemm._descriptors(a, b, cfg)
    values = dict(
        a_desc=a_desc,
        b_desc=b_desc,
        c_ptr=out,
        stride_cm=n,
        tile_expert_ptr=i32,
        tile_start_ptr=i32,
        offsets_ptr=i32,
        num_experts=e,
        N=n,
        K=k,
    )
    constants = dict(
        B_KMAJOR=kmajor,
        BLOCK_N=cfg["BLOCK_N"],
        GROUP_M=cfg["GROUP_M"],
        E_POW2=e,
        STAGES=cfg["STAGES"],
        CONSUMER_REGS=cfg["CONSUMER_REGS"],
        PRODUCER_REGS=cfg["PRODUCER_REGS"],
    )
    aligned = tuple(n for n in values if n.endswith("_ptr") or n in ("stride_cm", "N", "K"))
    return compile_for_hopper(gluon_gemm._sorted_matmul_kernel, values, constants, cfg["MAXNREG"], aligned)


def _compile_report() -> list[dict]:
    """Per configuration and weight order: shared memory and which of the expected instructions the PTX holds."""
    return [hopper_report(_compile_for_hopper(cfg, kmajor)) for cfg in gluon_gemm.CONFIGS for kmajor in (True, False)]


@requires_gluon
def test_compiles_for_hopper_without_a_gpu():
    """Every configuration compiles for sm_90 with the installed Triton, for both weight orders, fits an H100's
    shared memory, and is what it claims to be: warpgroup MMAs, TMA and register reallocation between the
    partitions. In a fresh interpreter without TRITON_INTERPRET (see test_gluon_wgrad)."""
    report = compile_report_in_child(__file__)
    assert len(report) == 2 * len(gluon_gemm.CONFIGS)
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
    with pytest.raises(ValueError, match="triton_ops.sorted_matmul"):
        gluon_gemm.sorted_matmul(a, b, offsets, tiles, tiles, out=torch.empty(64, 64, dtype=torch.bfloat16))


def test_weight_orders():
    """Which storage order of the logical ``[E, N, K]`` weight TMA reads: K- or N-contiguous, 16-byte strides."""
    w = torch.empty(4, 64, 128, dtype=torch.bfloat16)
    assert gluon_gemm._b_major(w) == "k"
    assert gluon_gemm._b_major(w.transpose(1, 2)) == "n"
    assert gluon_gemm._b_major(torch.empty(4, 64, 130, dtype=torch.bfloat16)[..., :128]) is None


def _reference(a, b, routing):
    bounds = routing.offsets.tolist()
    out = torch.zeros(a.shape[0], b.shape[1])
    for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[s:t] = a[s:t].float().cpu() @ b[e].float().cpu().T
    return out


def _routing_with_counts(counts: list[int], top_k: int, device):
    """A routing whose experts receive exactly ``counts`` (token, slot) pairs (``sum(counts) = T * top_k``)."""
    slots = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    # Each token's k slots must name distinct experts: deal the sorted slots round-robin over the tokens.
    idx = slots.view(top_k, slots.numel() // top_k).T.contiguous().to(device)
    return build_routing(idx, len(counts), gluon_gemm.BLOCK_M)


gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and gluon_gemm._GLUON and torch.cuda.get_device_capability()[0] == 9),
    reason="needs an sm_90 GPU",
)


@gpu
@pytest.mark.parametrize("config", range(len(gluon_gemm.CONFIGS)))
@pytest.mark.parametrize("kmajor", [True, False], ids=["k_contiguous", "n_contiguous"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_on_gpu(config, kmajor, dtype):
    """Experts of 0, 1, 127, 128, 129 rows; N and K not multiples of the tiles; 3 programs, so that each walks many
    tiles and both consumers take several turns."""
    torch.manual_seed(0)
    counts = [0, 1, 127, 128, 129, 300, 0, 83]
    routing = _routing_with_counts(counts, 2, "cuda")
    n, k, num_experts = 200, 200, len(counts)
    a = torch.randn(sum(counts), k, device="cuda", dtype=dtype)
    if kmajor:
        b = torch.randn(num_experts, n, k, device="cuda", dtype=dtype) / k**0.5
    else:
        b = (torch.randn(num_experts, k, n, device="cuda", dtype=dtype) / k**0.5).transpose(1, 2)
    out = torch.full((a.shape[0], n), float("nan"), device="cuda", dtype=dtype)
    gluon_gemm.sorted_matmul(
        a,
        b,
        routing.offsets,
        routing.tile_expert,
        routing.tile_start,
        out=out,
        config=gluon_gemm.CONFIGS[config],
        num_programs=3,
    )
    torch.cuda.synchronize()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(out.float().cpu(), _reference(a, b, routing), **tol)


@gpu
def test_every_program_many_tiles():
    """A Qwen3-like down projection on every SM: the ring's barriers wrap many times."""
    torch.manual_seed(1)
    top_k, num_experts, hidden, inter, tokens = 8, 16, 512, 192, 2048
    idx = torch.rand(tokens, num_experts, device="cuda").topk(top_k, dim=1).indices
    routing = build_routing(idx, num_experts, gluon_gemm.BLOCK_M)
    h = torch.randn(tokens * top_k, inter, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    out = torch.empty(tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
    gluon_gemm.sorted_matmul(h, w2, routing.offsets, routing.tile_expert, routing.tile_start, out=out)
    torch.testing.assert_close(out.float().cpu(), _reference(h, w2, routing), atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    print(json.dumps(_compile_report()))

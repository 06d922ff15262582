"""A/B of the memory-bound expert kernels (GPU only): the combine (ESS) before and after v2.2, and the glu
backward's column block. Prints achieved bandwidth (bytes read + written once) per shape.

    python benchmarks/ab_memory_kernels.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

# name: (H, I, E, k, T)
SHAPES = {
    "qwen3_30b_a3b@4096": (2048, 768, 128, 8, 4096),
    "qwen3_30b_a3b@16384": (2048, 768, 128, 8, 16384),
    "deepseek_v3_like@16384": (7168, 2048, 32, 8, 16384),
    "gpt_oss_20b@16384": (2880, 2880, 32, 4, 16384),
    "mixtral_8x7b@4096": (4096, 14336, 8, 2, 4096),
}


@triton.jit
def _combine_v21(y_ptr, stride_ym, stride_yn, inverse_ptr, w_ptr, top_k, out_ptr, stride_om, stride_on, N,
                 HAS_WEIGHTS: tl.constexpr, BLOCK_N: tl.constexpr):
    # v2.1's combine: runtime slot loop, 256 columns per program.
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, top_k):
        row = tl.load(inverse_ptr + token * top_k + j).to(tl.int64)
        y = tl.load(y_ptr + row * stride_ym + offs_n * stride_yn, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            y = y * tl.load(w_ptr + token * top_k + j).to(tl.float32)
        acc += y
    tl.store(out_ptr + token * stride_om + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def main():
    from hf_hetermoe.kernels import ExpertLayout, build_routing, triton_ops
    from hf_hetermoe.kernels import triton_kernels as tk

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    layout = ExpertLayout()
    for name, (H, I, E, k, T) in SHAPES.items():
        S = T * k
        index = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
        routing = build_routing(index, E, triton_ops.block_m_for(torch.device("cuda")))
        y = torch.randn(S, H, device="cuda", dtype=torch.bfloat16)
        w = torch.softmax(torch.randn(T, k, device="cuda"), -1)
        out_old = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)

        def old():
            _combine_v21[(T, triton.cdiv(H, 256))](y, y.stride(0), y.stride(1), routing.inverse, w.reshape(-1), k,
                                                   out_old, out_old.stride(0), out_old.stride(1), H,
                                                   HAS_WEIGHTS=True, BLOCK_N=256)

        def new():
            return triton_ops.combine(y, routing, w, T, k)

        old()
        want = (y.float()[routing.inverse.long()].view(T, k, H) * w[..., None]).sum(1)
        err_old = ((out_old.float() - want).norm() / want.norm()).item()
        err_new = ((new().float() - want).norm() / want.norm()).item()
        gbytes = (S + T) * H * 2 / 1e9
        t_old, t_new = (do_bench(f, warmup=10, rep=50, return_mode="median") for f in (old, new))
        print(f"{name:>24} combine  v2.1 {t_old * 1e3:7.1f} us ({gbytes / t_old:5.2f} TB/s)   "
              f"v2.2 {t_new * 1e3:7.1f} us ({gbytes / t_new:5.2f} TB/s)   rel err {err_old:.1e} / {err_new:.1e}")

        # glu backward, in place (values drift across repetitions; the traffic does not)
        g = torch.randn(S, I, device="cuda", dtype=torch.bfloat16)
        gu = torch.randn(S, 2 * I, device="cuda", dtype=torch.bfloat16)
        dout = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        dw_sorted = torch.empty(S, device="cuda", dtype=torch.float32)
        gate, up = gu[:, :I], gu[:, I:]

        def glu(block_n):
            tk._glu_backward_kernel[(S,)](
                g, g.stride(0), g.stride(1), gate, up, up.stride(0), up.stride(1), gate, up, up.stride(0),
                up.stride(1), g, g.stride(0), g.stride(1), routing.order, w.reshape(-1), dw_sorted, dout,
                dout.stride(0), dout.stride(1), dout, 0, 0, routing.expert, k, I, H, layout.alpha, layout.limit,
                GATED=True, ACT=layout.act_code, HAS_BIAS=False, BLOCK_N=block_n, num_warps=4)

        gbytes = 6 * S * I * 2 / 1e9  # read g, gate, up; write dgate, dup, w*h
        times = {bn: do_bench(lambda bn=bn: glu(bn), warmup=10, rep=50, return_mode="median") for bn in (256, 1024)}
        print(f"{name:>24} glu bwd  " + "   ".join(
            f"BLOCK_N={bn} {t * 1e3:7.1f} us ({gbytes / t:5.2f} TB/s)" for bn, t in times.items()) +
            f"   (launch uses {triton_ops.row_block_n(g, I)})")


if __name__ == "__main__":
    main()

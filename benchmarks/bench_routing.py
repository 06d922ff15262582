"""Routing metadata on the GPU: the torch-ops path against the three Triton kernels (issue 3, host overhead).

For each (T, k, E): checks that both paths give identical ``Routing`` tensors, then reports kernel launches, GPU
time (CUDA graph, no launch gaps), eager time and host time per call.

    python benchmarks/bench_routing.py
"""

from __future__ import annotations

import time

import torch


def bench(T: int, k: int, E: int, block_m: int = 128) -> None:
    import triton
    from torch.profiler import ProfilerActivity, profile

    from hf_hetermoe.kernels.routing import build_routing

    idx = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
    want = build_routing(idx, E, block_m, backend="torch")
    got = build_routing(idx, E, block_m, backend="triton")  # the first call compiles the kernels
    same = all(torch.equal(a, b) for a, b in zip(got, want))
    for backend in ("torch", "triton"):

        def fn(backend=backend):
            return build_routing(idx, E, block_m, backend=backend)

        gpu_us = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
        eager_us = triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(100):
            fn()
        host_us = (time.perf_counter() - began) / 100 * 1e6
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        launches = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
        print(
            f"T={T:>6} k={k:>2} E={E:>3} {backend:>6}: identical={same} launches={launches:3d} "
            f"gpu {gpu_us:7.1f} us  eager {eager_us:7.1f} us  host {host_us:7.1f} us/call",
            flush=True,
        )


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    for T, k, E in [(4096, 8, 128), (4096, 2, 8), (4096, 10, 512), (16384, 8, 128), (32768, 8, 128), (131072, 2, 512)]:
        bench(T, k, E)


if __name__ == "__main__":
    main()

"""Routing metadata: invariants of ``build_routing``, and the Triton counting sort (``triton_routing.py``) bit for
bit against the torch path. On CPU the kernels run under TRITON_INTERPRET=1 (see conftest)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE, requires_triton

from hf_hetermoe.kernels import Routing, build_routing
from hf_hetermoe.kernels.reference import routing_reference
from hf_hetermoe.kernels.routing import max_row_tiles


@pytest.mark.parametrize(
    "T,E,k,block_m", [(1, 1, 1, 16), (7, 3, 2, 16), (50, 13, 4, 16), (33, 8, 8, 64), (100, 5, 1, 32)]
)
def test_routing_invariants(T, E, k, block_m):
    index = torch.rand(T, E).topk(k, dim=-1).indices
    r = build_routing(index, E, block_m)
    S = T * k
    order, inverse = r.order.long(), r.inverse.long()
    # every (token, slot) appears exactly once, and inverse undoes order
    assert torch.equal(order.sort().values, torch.arange(S))
    assert torch.equal(inverse[order], torch.arange(S))
    # offsets: start at 0, sum to T*k, match per-expert counts, and bracket each expert's run
    assert r.offsets[0] == 0 and r.offsets[-1] == S
    counts = torch.bincount(index.reshape(-1), minlength=E)
    assert torch.equal(r.offsets.diff().long(), counts)
    flat = index.reshape(-1)
    assert torch.equal(flat[order], r.expert.long())
    # same answer as the naive host implementation (stable: ties keep token order)
    ref_order, ref_inverse, ref_offsets = routing_reference(index, E)
    assert torch.equal(order, ref_order) and torch.equal(inverse, ref_inverse)
    assert torch.equal(r.offsets.long(), ref_offsets)


@pytest.mark.parametrize("routing", ["skewed", "empty_experts"])
def test_row_tiles_cover_each_expert_once(routing):
    E, block_m = 6, 4
    if routing == "skewed":
        index = torch.full((21, 1), 2)
    else:
        index = torch.tensor([[0, 5], [5, 0], [0, 5]])
    r = build_routing(index, E, block_m)
    S = index.numel()
    assert r.tile_expert.numel() == max_row_tiles(S, E, block_m)
    covered = torch.zeros(S, dtype=torch.long)
    for e, start in zip(r.tile_expert.tolist(), r.tile_start.tolist()):
        if e == E:  # unused tile
            continue
        end = min(start + block_m, r.offsets[e + 1].item())
        assert r.offsets[e] <= start < end
        covered[start:end] += 1
    assert torch.equal(covered, torch.ones(S, dtype=torch.long))


# --- the Triton routing kernels against the torch path ---------------------------------------------------------

# (T, k, E, block_m, block, routing): block = pairs per block of the kernels (None: the default for S); small
# blocks give many blocks on interpreter-sized inputs. Edges: T = 1, E = 1, E not a power of two, E > block,
# E > 32 (several programs in the scan kernel), E > 512, experts without pairs, every pair on one expert (first,
# middle, last), S not a multiple of the block, k = E, repeated experts within a token, many row tiles per program.
TRITON_CASES = {
    "T=1_E=1": (1, 1, 1, 16, None, "topk"),
    "T=1_k=4": (1, 4, 6, 16, None, "topk"),
    "prime_E": (37, 3, 7, 16, 16, "topk"),
    "E>block": (50, 2, 40, 16, 16, "topk"),
    "k=E": (9, 4, 4, 16, 32, "topk"),
    "empty_experts": (3, 2, 11, 16, 16, "topk"),
    "pow2_E_k=8": (33, 8, 64, 64, 32, "topk"),
    "E>32_many_tiles": (100, 2, 130, 16, 64, "topk"),
    "E=513": (5, 4, 513, 128, None, "topk"),
    "block_m=4": (60, 2, 8, 4, 16, "topk"),
    "repeats": (64, 3, 5, 16, 16, "randint"),
    "skewed": (45, 2, 9, 8, 16, "skewed"),
    "one_expert_first": (21, 1, 6, 4, 8, "first"),
    "one_expert_mid": (40, 2, 5, 16, 16, "middle"),
    "one_expert_last": (19, 3, 7, 16, 8, "last"),
    "default_block_2_blocks": (150, 2, 12, 16, None, "topk"),
}


def _index(T, k, E, routing, device):
    if routing == "topk":
        return torch.rand(T, E, device=device).topk(k, dim=-1).indices
    if routing == "randint":
        return torch.randint(0, E, (T, k), device=device)
    if routing == "skewed":  # about half the pairs on expert 1, the rest spread
        index = torch.randint(0, E, (T, k), device=device)
        return torch.where(torch.rand(T, k, device=device) < 0.5, torch.ones_like(index), index)
    expert = {"first": 0, "middle": E // 2, "last": E - 1}[routing]
    return torch.full((T, k), expert, device=device, dtype=torch.long)


def _assert_same_routing(got, want):
    for name, a, b in zip(Routing._fields, got, want):
        assert a.dtype == b.dtype == torch.int32, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a, b), (name, a, b)


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(TRITON_CASES), ids=list(TRITON_CASES))
def test_triton_routing_matches_torch(case):
    from hf_hetermoe.kernels import triton_routing

    T, k, E, block_m, block, routing = TRITON_CASES[case]
    index = _index(T, k, E, routing, DEVICE)
    want = build_routing(index, E, block_m, backend="torch")
    _assert_same_routing(triton_routing.build_routing(index, E, block_m, block=block), want)
    if block is None:
        _assert_same_routing(build_routing(index, E, block_m, backend="triton"), want)


@requires_triton
@pytest.mark.triton_interpret
def test_triton_routing_int32_index_and_zero_tokens():
    index = torch.rand(13, 5, device=DEVICE).topk(2, dim=-1).indices
    want = build_routing(index, 5, 16, backend="torch")
    _assert_same_routing(build_routing(index.int(), 5, 16, backend="triton"), want)
    empty = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    _assert_same_routing(build_routing(empty, 5, 16, backend="triton"), build_routing(empty, 5, 16, backend="torch"))


def test_build_routing_backend_choice():
    index = torch.rand(4, 3).topk(2, dim=-1).indices
    with pytest.raises(ValueError, match="backend='cuda'"):
        build_routing(index, 3, 16, backend="cuda")
    # CPU tensors take the torch path under 'auto', interpreter or not
    _assert_same_routing(build_routing(index, 3, 16), build_routing(index, 3, 16, backend="torch"))


@requires_triton
@pytest.mark.triton_interpret
def test_triton_routing_compiles_fullgraph():
    """build_routing(backend='triton') inside torch.compile(fullgraph=True): on CUDA through the triton_op, on CPU
    (the interpreter's kernels cannot run on fake tensors) through the torch ops."""
    index = torch.rand(37, 7, device=DEVICE).topk(3, dim=-1).indices

    def fn(index):
        return tuple(build_routing(index, 7, 16, backend="triton"))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same_routing(Routing(*compiled(index)), build_routing(index, 7, 16, backend="torch"))


@requires_triton
def test_triton_op_traces_three_kernels():
    """The ``hetermoe::build_routing`` triton_op traces (fullgraph, dynamic shapes) into its three kernels. Runs
    without the interpreter in a subprocess: with it, ``wrap_triton`` returns plain Python kernels, which cannot
    run on fake tensors. The graph is captured, never run (no GPU needed)."""
    code = textwrap.dedent(
        """
        import torch
        from torch._functorch.aot_autograd import aot_module_simplified
        from hf_hetermoe.kernels import triton_routing

        graphs = []

        class Captured(Exception):
            pass

        def capture(gm, inputs):
            def compiler(graph, example_inputs):
                graphs.append(graph)
                raise Captured

            return aot_module_simplified(gm, inputs, fw_compiler=compiler)

        def fn(index):
            return torch.ops.hetermoe.build_routing(index, 7, 16)

        try:
            torch.compile(fn, fullgraph=True, dynamic=True, backend=capture)(torch.randint(0, 7, (37, 3)))
        except Exception as err:
            if not any(isinstance(e, Captured) for e in (err, err.__cause__, err.__context__)):
                raise
        targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
        print(sum("triton_kernel_wrapper" in t for t in targets))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "3", proc.stdout[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E", [(4096, 8, 128), (131072, 2, 512), (32768, 8, 257), (1000, 1, 64)])
def test_triton_routing_matches_torch_at_scale(T, k, E):
    """Large shapes on a GPU: every default block size, many blocks, E = 512 and E not a power of two."""
    index = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
    for block_m in (64, 128):
        want = build_routing(index, E, block_m, backend="torch")
        _assert_same_routing(build_routing(index, E, block_m, backend="triton"), want)


@pytest.mark.gpu
def test_triton_routing_compiles_with_inductor():
    index = torch.rand(3000, 64, device="cuda").topk(6, dim=-1).indices

    def fn(index):
        return tuple(build_routing(index, 64, 128, backend="triton"))

    compiled = torch.compile(fn, fullgraph=True)
    _assert_same_routing(Routing(*compiled(index)), build_routing(index, 64, 128, backend="torch"))

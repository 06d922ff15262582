"""Fused RMSNorm: the Triton kernels against the reference (forward and gradients), the variant check against
transformers' norm classes, and ``patch_rms_norms`` on tiny models. On CPU the kernels run under
TRITON_INTERPRET=1 (see conftest), whose fp32 -> bf16 casts truncate instead of rounding: bf16 gets its tolerance."""

import copy
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE, TOLERANCE, rel_err, requires_triton
from torch import nn

from hf_hetermoe.kernels.rmsnorm import rms_norm, rms_norm_reference
from hf_hetermoe.model_patches import get_model_patch
from hf_hetermoe.model_patches.norms import VARIANTS, patch_rms_norms, rms_norm_variant
from hf_hetermoe.model_patches.verify import build_tiny_model, tiny_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANT_IDS = [v.name for v in VARIANTS]
EPS = 1e-5
# Leading dims and H: rows narrower than a tile (one program), odd H, 3-D input, several tiles per backward
# program (13 tiles of 16 rows over 3 programs on CPU), and a single element per row.
SHAPES = {"odd_H": (37, 40), "3d": (2, 9, 96), "many_tiles": (200, 96), "H=1": (5, 1)}


def _inputs(shape, dtype, w_dtype, variant, device=DEVICE):
    """x with row scales from 1e-3 to 10 (eps matters in the small rows) and a weight of order one."""
    *lead, H = shape
    scale = torch.logspace(-3, 1, max(1, lead[-1]), device=device)[:, None]
    x = (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()
    weight = torch.randn(H, device=device) * 0.3 + (0.0 if variant.offset else 1.0)
    return x, weight.to(w_dtype).requires_grad_()


def _fwd_bwd(x, weight, variant, backend):
    fn = rms_norm_reference if backend == "reference" else rms_norm
    kwargs = {} if backend == "reference" else {"backend": backend}
    y = fn(x, weight, EPS, offset=variant.offset, cast_before_weight=variant.cast_before_weight, **kwargs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    return (y, *torch.autograd.grad(y, [x, weight], dy))


def _check_triton_vs_reference(x, weight, variant):
    got = _fwd_bwd(x, weight, variant, "triton")
    want = _fwd_bwd(x, weight, variant, "reference")
    tol = TOLERANCE[torch.bfloat16 if torch.bfloat16 in (x.dtype, weight.dtype) else x.dtype]
    for name, a, b in zip(("y", "dx", "dweight"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_triton_matches_reference(shape, dtype, variant):
    _check_triton_vs_reference(*_inputs(shape, dtype, dtype, variant), variant)


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize(
    "dtype,w_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_triton_mixed_weight_dtype(dtype, w_dtype, variant):
    """Output in promote_types(weight, x) for cast_before_weight, else x.dtype; dweight in the weight's dtype."""
    _check_triton_vs_reference(*_inputs((3, 7, 40), dtype, w_dtype, variant), variant)


# Dtypes whose fp32 -> low-precision casts the kernels round exactly as torch does (the interpreter truncates bf16).
ROUNDING_DTYPES = [torch.float16] if DEVICE.type == "cpu" else [torch.float16, torch.bfloat16]


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("w_fp32", [False, True], ids=["w_same", "w_fp32"])
@pytest.mark.parametrize("dtype", ROUNDING_DTYPES, ids=str)
def test_triton_rounds_where_transformers_rounds(dtype, w_fp32, variant):
    """y and dx equal the reference bit for bit but for rare flips (the fp32 sums run in another order): a
    rounding taken at another point (e.g. no cast of xhat before the weight) changes a quarter of the elements.
    dweight is not compared this way: autograd rounds each product before summing, the kernel sums in fp32."""
    x, weight = _inputs((200, 96), dtype, torch.float32 if w_fp32 else dtype, variant)
    got = _fwd_bwd(x, weight, variant, "triton")
    want = _fwd_bwd(x, weight, variant, "reference")
    for name, a, b in zip(("y", "dx"), got, want):
        assert a.dtype == b.dtype
        assert (a != b).float().mean().item() < 0.01, name


@requires_triton
@pytest.mark.triton_interpret
def test_triton_strided_input_frozen_weight_and_expanded_grad():
    variant = VARIANTS[0]
    base = torch.randn(4, 6, 56, device=DEVICE)
    x = base[..., 3:43].requires_grad_()  # row stride 56, H = 40
    weight = torch.randn(40, device=DEVICE)  # frozen: no dweight
    y = rms_norm(x, weight, EPS, backend="triton")
    assert torch.allclose(y, rms_norm_reference(x, weight, EPS), rtol=1e-5, atol=1e-6)
    (dx,) = torch.autograd.grad(y.sum(), [x])  # dy is an expanded (stride 0) tensor
    (dx_ref,) = torch.autograd.grad(rms_norm_reference(x, weight, EPS).sum(), [x])
    assert rel_err(dx, dx_ref) < TOLERANCE[torch.float32]
    xt = torch.randn(40, 9, device=DEVICE).t().requires_grad_()  # column stride 9: copied to rows
    _check_triton_vs_reference(xt, torch.randn(40, device=DEVICE).requires_grad_(), variant)


@requires_triton
@pytest.mark.triton_interpret
def test_triton_zero_rows_and_deterministic_dweight():
    weight = torch.randn(24, device=DEVICE, requires_grad=True)
    empty = torch.randn(0, 24, device=DEVICE, requires_grad=True)
    y = rms_norm(empty, weight, EPS, backend="triton")
    assert y.shape == (0, 24)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    x = torch.randn(3, 50, 24, device=DEVICE, requires_grad=True)
    first, second = (_fwd_bwd(x, weight, VARIANTS[1], "triton")[2] for _ in range(2))
    assert torch.equal(first, second)


def test_rms_norm_argument_errors_and_cpu_default():
    x, weight = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="cast_before_weight=False"):
        rms_norm(x, weight, EPS, offset=1.0)
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        rms_norm(x, torch.randn(7), EPS)
    with pytest.raises(ValueError, match="backend='cuda'"):
        rms_norm(x, weight, EPS, backend="cuda")
    if DEVICE.type == "cpu":  # 'auto' takes the reference on CPU, interpreter or not
        assert torch.equal(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS))


@requires_triton
@pytest.mark.triton_interpret
def test_compiled_fullgraph_matches_eager():
    """rms_norm(backend='triton') inside torch.compile(fullgraph=True): on CUDA through the triton_ops, on CPU
    through the reference (the interpreter's kernels cannot run on fake tensors)."""
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, device=DEVICE, requires_grad=True)

    def step(x, weight):
        return rms_norm(x, weight, EPS, cast_before_weight=False, backend="triton").square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, weight), [x, weight])
    want = torch.autograd.grad(step(x, weight), [x, weight])
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOLERANCE[torch.float32]


@requires_triton
def test_autograd_traces_into_the_triton_ops():
    """Under torch.compile(fullgraph=True), the autograd function's forward and backward trace through the
    ``hetermoe::rms_norm_fwd`` / ``rms_norm_bwd`` triton_ops into one kernel each. Runs without the interpreter in
    a subprocess (with it, ``wrap_triton`` returns plain Python kernels, which cannot run on fake tensors); the
    joint graph is captured, never run (no GPU needed)."""
    code = textwrap.dedent(
        """
        import torch
        from torch._functorch.aot_autograd import aot_module_simplified
        from hf_hetermoe.kernels import triton_rmsnorm

        joints = []

        def capture(gm, inputs):
            def partition(joint, joint_inputs, **kwargs):
                joints.append(joint)
                raise RuntimeError("captured")

            return aot_module_simplified(gm, inputs, fw_compiler=lambda g, _: g.forward, partition_fn=partition)

        def fn(x, weight):
            return triton_rmsnorm.rms_norm(x, weight, 1e-6, cast_before_weight=False)

        x, weight = torch.randn(6, 40, requires_grad=True), torch.randn(40, requires_grad=True)
        try:
            torch.compile(fn, fullgraph=True, backend=capture)(x, weight)
        except Exception:
            pass  # raised on purpose once the joint graph is captured
        targets = [str(node.target) for node in joints[0].graph.nodes if node.op == "call_function"]
        print(sum("triton_kernel_wrapper" in t for t in targets))
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "2", proc.stdout[-2000:]


# --- the variant check ---------------------------------------------------------------------------------------------

# (modeling module, class, expected variant): every order transformers' MoE families use, and look-alikes.
NORM_CLASSES = [
    ("qwen3_moe", "Qwen3MoeRMSNorm", "cast_before_weight"),
    ("qwen2_moe", "Qwen2MoeRMSNorm", "cast_before_weight"),
    ("mixtral", "MixtralRMSNorm", "cast_before_weight"),
    ("olmoe", "OlmoeRMSNorm", "cast_before_weight"),
    ("deepseek_v3", "DeepseekV3RMSNorm", "cast_before_weight"),
    ("llama4", "Llama4TextRMSNorm", "cast_before_weight"),
    ("gpt_oss", "GptOssRMSNorm", "fp32_weight"),
    ("flex_olmo", "FlexOlmoRMSNorm", "fp32_weight"),
    # transformers 5.17 casts before the weight, 5.23 multiplies in fp32: the check tells which one is installed.
    ("nemotron_h", "NemotronHRMSNorm", ("fp32_weight", "cast_before_weight")),
    ("qwen3_next", "Qwen3NextRMSNorm", "fp32_one_plus_weight"),
    ("qwen3_5_moe", "Qwen3_5MoeRMSNorm", "fp32_one_plus_weight"),
    ("switch_transformers", "SwitchTransformersLayerNorm", None),  # casts to the weight's dtype instead
    ("cohere2_moe", "Cohere2MoeLayerNorm", None),  # subtracts the mean
]


@pytest.mark.parametrize("module,name,expected", NORM_CLASSES, ids=[c[1] for c in NORM_CLASSES])
def test_variant_of_transformers_norm_classes(module, name, expected):
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    except (ImportError, AttributeError):
        pytest.skip(f"{name} is not in this transformers version")
    variant = rms_norm_variant(cls(24, eps=1e-5))
    assert (variant.name if variant else None) in (expected if isinstance(expected, tuple) else (expected,))


def test_variant_check_rejects_non_rms_modules():
    assert rms_norm_variant(nn.LayerNorm(16, bias=False)) is None  # subtracts the mean
    assert rms_norm_variant(nn.LayerNorm(16)) is None  # a bias
    assert rms_norm_variant(nn.Linear(16, 16, bias=False)) is None  # 2-D weight
    assert rms_norm_variant(nn.RMSNorm(16)) is None  # eps=None: the dtype's machine epsilon, no number attribute


# --- patch_rms_norms on tiny models ----------------------------------------------------------------------------------


def _step(model, inputs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]


@requires_triton
@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "model_type,variant",
    [
        ("qwen3_moe", "cast_before_weight"),
        ("olmoe", "cast_before_weight"),
        ("gpt_oss", "fp32_weight"),
        ("mixtral", "cast_before_weight"),
    ],
)
def test_patched_tiny_model_matches_unpatched(model_type, variant, tmp_path):
    patch = get_model_patch(model_type)
    model = build_tiny_model(patch, device=str(DEVICE))
    truth = copy.deepcopy(model)
    inputs = tiny_inputs(patch, model)
    state = model.state_dict()
    hooks = _hook_counts(model)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]

    count, undo = patch_rms_norms(model, backend="triton")
    assert count == len(norms) > 0
    assert all("forward" in m.__dict__ and rms_norm_variant(m).name == variant for m in norms)
    assert patch_rms_norms(model)[0] == 0  # already patched: left alone
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert _hook_counts(model) == hooks

    logits, grads = _step(model, inputs)
    logits_ref, grads_ref = _step(truth, inputs)
    assert rel_err(logits, logits_ref) < 1e-5
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < 1e-5, name

    model.save_pretrained(tmp_path / "patched")
    truth.save_pretrained(tmp_path / "truth")
    for path in (tmp_path / "truth").iterdir():
        assert (tmp_path / "patched" / path.name).read_bytes() == path.read_bytes(), path.name

    undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert rel_err(_step(model, inputs)[0], logits_ref) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", [(4099, 4096), (2, 1000, 7168), (16384, 128), (33, 65536)], ids=str)
def test_triton_matches_reference_at_scale(shape, variant):
    """Real widths on a GPU in bf16 (hidden sizes, per-head q/k norms, the widest row), fp32 weights too."""
    for w_dtype in (torch.bfloat16, torch.float32):
        _check_triton_vs_reference(*_inputs(shape, torch.bfloat16, w_dtype, variant), variant)

"""Compiling the Gluon kernels for Hopper without a GPU, shared by their tests. A plain module, not conftest: the
child process that compiles imports it, and must not get conftest's TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
from pathlib import Path

# The largest dynamic shared memory a program may opt into on an H100 / H200 (227 KiB).
HOPPER_SHARED_LIMIT = 232448
# What a warp-specialised Hopper kernel of ours must hold in its PTX: warpgroup MMAs, TMA, register reallocation
# between the partitions, mbarrier waits.
HOPPER_INSTRUCTIONS = ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg", "mbarrier.try_wait")


def compile_for_hopper(fn, values: dict, constants: dict, maxnreg: int, aligned: tuple = ()):
    """Gluon kernel ``fn`` compiled for sm_90 (nothing is launched): runtime arguments typed from ``values`` (CPU
    tensors, descriptors, ints), ``constants`` as constexprs, the ``aligned`` arguments specialised as 16-divisible
    as the launcher's would be."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    signature = {name: "constexpr" if name in constants else mangle_type(values[name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = GluonASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}, attrs)
    options = dict(num_warps=4, maxnreg=maxnreg, enable_fp_fusion=True)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def hopper_report(kernel) -> dict:
    """A compiled kernel's shared memory and which of ``HOPPER_INSTRUCTIONS`` its PTX lacks."""
    ptx = kernel.asm["ptx"]
    return dict(shared=kernel.metadata.shared, missing=[i for i in HOPPER_INSTRUCTIONS if i not in ptx])


def compile_report_in_child(test_file: str) -> list[dict]:
    """Run ``test_file`` as a script (its ``__main__`` compiles Gluon kernels for sm_90 and prints a JSON report)
    and return the report. In a fresh interpreter without TRITON_INTERPRET: the interpreter the CPU suite runs in
    patches Triton's language while kernels run, which a real compilation must not meet."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, test_file], env=env, capture_output=True, text=True, timeout=900, cwd=Path(test_file).parent
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

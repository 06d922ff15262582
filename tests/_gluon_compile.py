"""Compiling the Gluon kernels for Hopper without a GPU, shared by their tests. A plain module, not conftest: the
child process that compiles imports it, and must not get conftest's TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
from pathlib import Path

# The largest dynamic shared memory a program may opt into on an H100 / H200 (227 KiB).
HOPPER_SHARED_LIMIT = 232448


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

"""``hetermoe env``: versions and devices, for bug reports."""

from __future__ import annotations

import platform


def env_command_parser(subparsers):
    parser = subparsers.add_parser("env", help="print versions, devices and the kernel backend in use")
    parser.set_defaults(func=env_command)
    return parser


def env_info() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    import hf_hetermoe

    from ..kernels import resolve_backend, triton_available
    from ..model_patches import supported_model_types

    info = {
        "hf-hetermoe": hf_hetermoe.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "triton": "not installed",
        "cuda devices": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "experts backend (auto)": resolve_backend(
            "auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ),
        "supported model types": ", ".join(supported_model_types()),
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    return info


def env_command(args) -> int:
    for key, value in env_info().items():
        print(f"- {key}: {value}")
    return 0

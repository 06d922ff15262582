"""``hetermoe env``: versions and devices, for bug reports."""

from __future__ import annotations

import os
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
        "prepare defaults": _prepare_defaults(),
        "HETERMOE_* set": ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("HETERMOE_"))
        or "none",
        "tuning cache": _tuning_cache(),
    }
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    return info


def _prepare_defaults() -> str:
    """What ``prepare(model)`` turns on with no arguments (``HeterMoEConfig``'s boolean fields)."""
    from dataclasses import fields

    from ..config import HeterMoEConfig

    config = HeterMoEConfig()
    return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in fields(config))


def _tuning_cache() -> str:
    """Where autotuned tiles are cached, and how many choices it holds for this version of the kernels (entries of
    older versions stay in the file but are ignored)."""
    import json

    from ..kernels import tuning

    path = tuning.cache_path()
    try:
        names = list(json.loads(path.read_text()))
    except FileNotFoundError:
        return f"{path} (not created yet)"
    except (OSError, ValueError, TypeError) as err:
        return f"{path} (unreadable: {type(err).__name__}; it is rebuilt on the next tuning)"
    current = sum(name.startswith(f"v{tuning.VERSION}|") for name in names)
    stale = f", {len(names) - current} of older kernel versions ignored" if len(names) > current else ""
    return f"{path} ({current} tuned choices{stale}, autotune {'on' if tuning.autotune_enabled() else 'off'})"


def env_command(args) -> int:
    for key, value in env_info().items():
        print(f"- {key}: {value}")
    return 0

"""``hetermoe check``: prepared against unprepared, per family, on this machine's transformers, torch and device.

    hetermoe check                      # every family this transformers ships, CPU fp32
    hetermoe check qwen3_moe mixtral --device cuda --dtype bfloat16

For each family a tiny model is built from its config (nothing is downloaded), trained one step prepared and
unprepared, and compared: logits, loss with router aux loss, every gradient, the state dict, a ``save_pretrained``
round trip through plain transformers and greedy ``generate`` (the checks behind ``MODEL_COMPATIBILITY.md``; fp32
within round-off, bf16 / fp16 against transformers' own distance from fp32). Exit status 1 if any family fails.
"""

from __future__ import annotations

from pathlib import Path

from hf_hetermoe.files import write_json

_DTYPES = ("float32", "bfloat16", "float16")


def check_command_parser(subparsers):
    parser = subparsers.add_parser(
        "check", help="verify prepared vs unprepared tiny models of each family on this machine"
    )
    parser.add_argument("families", nargs="*", metavar="FAMILY",
                        help="model types or family names (default: every family this transformers ships)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=_DTYPES,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="experts backend of the prepared model (auto: Triton on CUDA, the reference on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write every report to this JSON file")
    parser.set_defaults(func=check_command)
    return parser


def resolve_families(names: list[str]):
    """The registered model patches named by model type or family (case-insensitive), in the order given; all of
    them, without names. Raises SystemExit naming what is supported for an unknown name."""
    from ..model_patches import MODEL_PATCHES, model_patches

    if not names:
        return model_patches()
    by_family = {p.family.lower(): p for p in model_patches()}
    chosen = []
    for name in names:
        patch = MODEL_PATCHES.get(name) or by_family.get(name.lower())
        if patch is None:
            raise SystemExit(
                f"hetermoe check: no family {name!r}; model types: {', '.join(sorted(MODEL_PATCHES))}"
            )
        if patch not in chosen:
            chosen.append(patch)
    return chosen


def check_command(args) -> int:
    import torch
    import transformers

    from ..model_patches.verify import verify_family

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("hetermoe check: --device cuda but torch sees no CUDA device; use --device cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    patches = resolve_families(args.families)
    print(f"hetermoe check: transformers {transformers.__version__}, torch {torch.__version__}, {device}, "
          f"{dtype_name}, backend {args.backend}")
    reports, failed = {}, []
    for patch in patches:
        if not patch.available():
            print(f"  SKIP  {patch.family}: not in transformers {transformers.__version__}")
            continue
        report = verify_family(patch, backend=args.backend, dtype=dtype, device=device)
        reports[patch.family] = report.to_dict()
        if report.passed:
            print(f"  PASS  {patch.family}: logits Δ {report.logits_delta:.1e}, gradients Δ {report.grad_delta:.1e}")
        else:
            failed.append(patch.family)
            print(f"  FAIL  {patch.family}: {'; '.join(report.failures())}")
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    if args.json is not None:
        write_json(args.json, {"transformers": transformers.__version__, "torch": torch.__version__, "device": device,
                               "dtype": dtype_name, "backend": args.backend, "families": reports},
                   indent=1, default=str)
    return 1 if failed else 0

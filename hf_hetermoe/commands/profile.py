"""``hetermoe profile``: measure this GPU (or, under torchrun, every rank's GPU) for the planner.

    hetermoe profile --model Qwen/Qwen3-30B-A3B --seq-len 4096 --micro-batch-size 1 --out profiles.json
    torchrun --nproc-per-node 2 -m hf_hetermoe.cli profile --model cfg.json --emulate-rank 1=v100-like ...
"""

from __future__ import annotations

import argparse
import contextlib
import os

from hf_hetermoe.errors import HeterMoEError


def profile_command_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("profile", help="measure attention, expert, memory and link costs of GPUs")
    parser.add_argument("--model", required=True, help="config.json, checkpoint directory or hub id")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="sequences per attention micro-batch")
    parser.add_argument("--out", default="profiles.json", help="profiles JSON to create or merge into")
    parser.add_argument("--emulate", default=None, help="profile as an emulated GPU (preset, e.g. v100-like)")
    parser.add_argument("--emulate-rank", action="append", default=[], metavar="RANK=PRESET",
                        help="under torchrun: emulate PRESET on RANK (repeatable)")
    parser.set_defaults(func=profile_command)
    return parser


def profile_command(args: argparse.Namespace) -> int:
    try:
        import torch

        from hf_hetermoe.emulate import emulate
        from hf_hetermoe.planner.model_dims import model_dims
        from hf_hetermoe.profiler import measure_links, profile_device, save_profiles

        if not torch.cuda.is_available():
            raise HeterMoEError("`hetermoe profile` needs a CUDA GPU; none is visible here")
        dist = None
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            import torch.distributed as dist

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        rank = dist.get_rank() if dist else 0
        per_rank = dict(item.split("=", 1) for item in args.emulate_rank)
        preset = per_rank.get(str(rank), args.emulate)
        config = args.model
        if not os.path.exists(config):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(config)
        with emulate(preset) if preset else contextlib.nullcontext() as info:
            kind, prof = profile_device(config, args.seq_len, args.micro_batch_size, emulation=info)
        links = measure_links()
        if dist:
            kinds: list[str] = [""] * dist.get_world_size()
            dist.all_gather_object(kinds, kind)
            for peer, gbps in links.items():
                prof.link_gbps[kinds[peer]] = min(gbps, prof.link_gbps.get(kinds[peer], gbps))
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (kind, prof))
        else:
            gathered = [(kind, prof)]
        if rank == 0:
            profiles = {}
            for k, p in gathered:  # one entry per kind: keep the slowest rank of that kind
                if k not in profiles or p.attn_fwd_ms > profiles[k].attn_fwd_ms:
                    profiles[k] = p
            save_profiles(args.out, profiles, model_dims(config).to_dict())
            for k, p in profiles.items():
                tag = " [EMULATED]" if p.emulated else ""
                print(f"{k}{tag}: attention fwd {p.attn_fwd_ms:.2f} ms bwd {p.attn_bwd_ms:.2f} ms per "
                      f"{p.attn_tokens} tokens; expert fwd {p.expert_fwd_ms[-1]:.2f} ms at "
                      f"{p.expert_tokens[-1]} tokens")
            print(f"wrote {args.out}")
        if dist:
            dist.destroy_process_group()
    except HeterMoEError as err:
        print(f"hetermoe profile: error: {err}")
        return 2
    return 0

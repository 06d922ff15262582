"""``hetermoe`` command line, in accelerate's pattern: each subcommand lives in
``hf_hetermoe/commands/<name>.py`` and exposes ``<name>_command_parser(subparsers)``, which registers
its parser and sets ``func`` to ``<name>_command(args)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# One line per subcommand; the module is imported lazily so `hetermoe --help` stays fast.
SUBCOMMANDS: tuple[str, ...] = ("env", "check", "demo", "profile", "plan", "simulate", "launch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("hetermoe", description="hf-hetermoe: fast MoE fine-tuning for transformers")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"hf_hetermoe.commands.{name}")
        getattr(module, f"{name}_command_parser")(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "launch":  # accelerate's options pass through verbatim: no argparse here
        from hf_hetermoe.commands.launch import launch_main

        return launch_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``hetermoe demo``: fine-tune a small Mixtral-style model end to end on the built-in corpus."""

from __future__ import annotations


def demo_command_parser(subparsers):
    from ..demo import add_demo_arguments

    parser = subparsers.add_parser(
        "demo", help="fine-tune a prepared MoE: a tiny Mixtral on the built-in corpus (no Hub), or --model"
    )
    add_demo_arguments(parser)
    parser.set_defaults(func=demo_command)
    return parser


def demo_command(args) -> int:
    from ..demo import run

    return run(args)

"""Subcommands of the ``hetermoe`` CLI (see ``hf_hetermoe/cli.py``)."""

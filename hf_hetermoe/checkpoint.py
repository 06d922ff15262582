"""Checkpoints that are never half-written.

``atomic_save_pretrained`` writes into a temporary sibling folder and swaps it into place only once every
file is complete, so a crash (or a full disk) during a save leaves the previous checkpoint whole. Replacing an existing
checkpoint takes two renames; a crash exactly between them leaves the previous checkpoint complete in the
sibling folder ``.<name>.old-*`` (never deleted before the new one is in place).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def atomic_save_pretrained(model, save_directory: str | os.PathLike, *extra, **save_kwargs) -> Path:
    """``model.save_pretrained(save_directory)`` (and ``x.save_pretrained`` for each of ``extra``, e.g. a
    tokenizer), atomically: the directory holds either the previous checkpoint or the complete new one.

    Returns the final path.
    """
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another output path")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        model.save_pretrained(staging, **save_kwargs)
        for obj in extra:
            obj.save_pretrained(staging)
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def swap_in(staging: Path, target: Path) -> None:
    """Make the complete directory ``staging`` become ``target`` (fsync, then renames; see the module docstring)."""
    _fsync_tree(staging)
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        retired.rmdir()
        os.replace(target, retired)  # both renames are atomic on one filesystem
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())

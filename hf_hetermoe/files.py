"""Files written whole or not at all.

Every file hetermoe writes for a user (a plan, profiles, a cluster file, a trace, a compatibility report, a results
CSV) goes through :func:`atomic_write`: the bytes go to a temporary file beside the target, are flushed to disk, and
the temporary file is renamed over the target. An interrupted or failed write leaves the previous file as it was, and
two processes writing the same file leave one of their versions, never a mix. (Checkpoint folders have their own
swap: :func:`hf_hetermoe.checkpoint.atomic_save_pretrained`. The kernels' tuning cache, a layer below this package,
merges its entries the same way in ``kernels/tuning.py``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json", "write_text"]


def _new_file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would give: the existing file's, else 0o666 less the umask (``mkstemp``
    makes 0o600 files, which would hide a results file from the other users of a shared machine)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open ``path`` for writing (``mode`` "w" or "wb", ``open``'s keyword arguments such as ``newline``), as a
    temporary file in the same folder that replaces ``path`` when the block ends without an exception. The folder is
    created if missing. On an exception the temporary file is removed and ``path`` is left untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing from the start: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _new_file_mode(path))
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically. Returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> Path:
    """``data`` as JSON (``json.dump``'s keyword arguments), with a final newline, atomically. The data is encoded
    before the file is opened, so a value JSON cannot encode raises with nothing written. Returns the path."""
    return write_text(path, json.dumps(data, **dump_kwargs) + "\n")

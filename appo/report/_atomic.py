"""Replace a file atomically: write a temporary file in the same directory, then rename it over
the target (a rename within one filesystem is atomic: readers see the old file or the new one)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Union

# mkstemp creates files private to the user (0600); outputs get the mode a plain open() would give
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def atomic_open(path: Union[str, Path], mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Yields a file opened with `mode` ("w" or "wb"); on a clean exit it replaces `path`, on an
    exception the temporary file is removed and `path` is left as it was. Not fsynced: this guards
    against a crashed process, not against a crashed machine."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

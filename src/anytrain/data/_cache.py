"""A small on-disk cache of generated numpy arrays (``.npz``): atomic writes, corrupt files ignored."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$ANYTRAIN_CACHE`` if set, else ``~/.cache/anytrain``."""
    env = os.environ.get("ANYTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anytrain"


def cache_key(prefix: str, args: dict[str, Any]) -> str:
    blob = json.dumps(args, sort_keys=True, default=str).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:20]}.npz"


def load_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays stored at ``path``, or ``None`` if the file is absent, unreadable or lacks a key."""
    if not path.is_file():
        return None
    try:
        # Open the file ourselves: np.load leaks its own handle when the zip is corrupt.
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as f:
            return {k: np.array(f[k]) for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.info("ignoring unreadable cache file %s (%s); regenerating", path, e)
        return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` atomically (temp file in the same directory, then ``os.replace``), so a
    reader never sees a half-written file. Failure to write (read-only home, full disk) is not an error: the
    data are simply regenerated next time. Returns whether the file was written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.info("could not write cache file %s (%s)", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False

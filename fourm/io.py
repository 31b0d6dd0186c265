"""Atomic file writes: readers see the old file or the whole new one, never a partial one.

Every artifact fourm writes outside orbax (configs, manifests, metrics summaries, PNGs, reports,
tokenizer files) goes through `atomic_write`: the bytes land in a hidden temporary file next to
the target, are flushed to disk, and replace the target with one `os.replace` (atomic on POSIX
within a filesystem). A crash mid-write leaves at most a stray `.<name>.tmp<pid>` file, which no
reader looks at.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (text is UTF-8 encoded) to `path` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when the write or the rename failed
            tmp.unlink()
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs) -> Path:
    """`atomic_write` of `json.dumps(obj, indent=2, sort_keys=True)` plus a newline."""
    kw = dict(indent=2, sort_keys=True)
    kw.update(dumps_kwargs)
    return atomic_write(path, json.dumps(obj, **kw) + "\n")


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """`atomic_write` of one array in .npy format (no pickled objects)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return atomic_write(path, buf.getvalue())

"""Atomic file writes, and paths that stay inside their folder.

Atomic writes: readers see the old file or the whole new one, never a partial one.

Every artifact fourm writes outside orbax (configs, manifests, metrics summaries, PNGs, reports,
tokenizer files) goes through `atomic_write`: the bytes land in a hidden temporary file next to
the target, are flushed to disk, and replace the target with one `os.replace` (atomic on POSIX
within a filesystem). A crash mid-write leaves at most a stray `.<name>.tmp<pid>` file, which no
reader looks at.

Paths inside their folder: every path fourm reads from a dataset folder or artifact (aligned-folder
samples, shard files named by a manifest, tokenizer exports, checkpoint steps) goes through
`inside(folder, path)`, which resolves symlinks and `..` and refuses, by name, a path that lands
outside the folder: a dataset must not be able to make fourm read /etc/passwd into a shard.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class PathEscapeError(ValueError):
    """A path read from a folder's data resolves outside that folder (symlink or `..`)."""

    def __init__(self, what: str, path: Path, real: Path, folder: Path):
        self.path, self.real, self.folder = path, real, folder
        self.reason = (f"resolves to {real}, outside its folder {folder} (a symlink or '..' "
                       f"leaving the folder); refusing to read it")
        super().__init__(f"{what} {path} {self.reason}")

    def __reduce__(self):
        return (type(self), (str(self).split(" ", 1)[0], self.path, self.real, self.folder))


def inside(folder: str | os.PathLike, path: str | os.PathLike, what: str = "path") -> Path:
    """`folder / path`, checked: PathEscapeError when, symlinks resolved, it leaves `folder`.

    `path` may be relative (to `folder`, as manifests write them) or absolute. The folder itself
    may be a symlink (where the user keeps their data is their business); what it contains may not
    point outside it."""
    root = Path(folder).resolve()
    given = Path(folder) / path
    real = given.resolve()  # strict=False: a missing file is the caller's error to name
    if real != root and not real.is_relative_to(root):
        raise PathEscapeError(what, given, real, root)
    return given


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError,
                     missing: str = "no such file") -> dict:
    """The JSON object in `path`, or `error` with one line naming the file: missing (`missing`
    says what was expected there), not valid JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


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

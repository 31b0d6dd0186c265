"""The pre-tokenized shard format: records, manifest, opening and verifying a shard folder.

One folder = `shard-KKKKK-of-NNNNN.array_record` files plus `manifest.json` (written last by the
writer, `fourm.tokenizers.pretokenize`). One ArrayRecord record = one sample =
`safetensors.numpy.save({modality: array})` bytes (no pickle); keys are registry modality names
plus '_index' (the sample's index in the source). The manifest lists every shard with its record
count, size in bytes and sha256.

Readers (the trainer's input pipeline, benchmarks, tools) open a folder with `open_shards`, which
refuses a folder whose files disagree with the manifest *before* anything trains on it: names,
sizes, record counts, and (by default) the sha256 of every byte. A same-size corruption would
otherwise pass the cheap checks and crash minutes into training, or worse, train on damaged
records. A mismatch names the shard file and, where a record no longer reads, the record.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load as _st_load, save as _st_save

from fourm.io import inside, read_json_object

FORMAT = "fourm.pretokenized/1"
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
# group_size:1 = one record per chunk, the layout grain wants for fast random access (and a
# corrupted chunk then names exactly one record).
WRITER_OPTIONS = "group_size:1"


class ShardError(ValueError):
    """A shard folder whose files do not match its manifest (names the file, and the record)."""


# ------------------------------------------------------------------------------------ records
def encode_record(arrays) -> bytes:
    # np.array(copy order C), not np.ascontiguousarray: the latter turns 0-d arrays into 1-d.
    return _st_save({k: np.array(v, order="C") for k, v in arrays.items()})


def decode_record(data: bytes) -> dict[str, np.ndarray]:
    """One record's bytes -> {modality name: array} (plus '_index')."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_record takes the record's bytes, got {type(data).__name__}")
    try:
        return dict(_st_load(bytes(data)))
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise ValueError(f"record is not a valid safetensors blob ({len(data)} bytes): {e}") from None


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}{SHARD_SUFFIX}"


class DecodedSource:
    """Random-access source of decoded records (grain's RandomAccessDataSource protocol)."""

    def __init__(self, raw):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        return decode_record(self.raw[i])

    def __repr__(self) -> str:
        return f"DecodedSource({self.raw!r})"


# ------------------------------------------------------------------------------------ manifest
def read_manifest(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"pre-tokenized dataset directory {d} does not exist")
    path = inside(d, MANIFEST, "manifest")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {d} is not a finished pre-tokenized dataset "
                                f"(the manifest is written last; rerun fourm-pretokenize to finish)")
    manifest = read_json_object(path)
    if manifest.get("format") != FORMAT:
        got = manifest.get("format")
        raise ValueError(f"{path}: format {got!r}, this code reads {FORMAT!r}")
    for key in ("shards", "modalities", "num_records"):
        if key not in manifest:
            raise ValueError(f"{path} lacks field {key!r}")
    return manifest


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)  # hashlib releases the GIL on large buffers: threads hash in parallel
    return h.hexdigest()


def _first_bad_record(path: Path) -> str:
    """Where a shard that fails its checksum is damaged, in words: the first record that no longer
    reads (Riegeli checks each chunk; one record per chunk) or decodes, when there is one."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path))
        n = reader.num_records()
    except Exception as e:  # noqa: BLE001 - the index itself is damaged
        return f"its record index does not read ({type(e).__name__}: {str(e)[:200]})"
    try:
        for i in range(n):
            try:
                decode_record(reader.read([i])[0])
            except Exception as e:  # noqa: BLE001 - Riegeli hash errors, safetensors errors
                return f"record {i} of {n} is damaged ({type(e).__name__}: {str(e)[:200]})"
    finally:
        reader.close()
    return f"all {n} records still read, so the change is inside record data"


def verify_shards(directory: str | os.PathLike, manifest: dict, *, threads: int = 4) -> dict:
    """Check every listed shard's sha256 against the manifest; ShardError naming the first
    mismatching file (and its damaged record). Returns {"bytes", "seconds"} (the cost)."""
    d = Path(directory)
    t0 = time.perf_counter()
    shards = manifest["shards"]
    paths = [inside(d, s["file"], "shard file") for s in shards]
    with cf.ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        digests = list(pool.map(sha256_file, paths))
    for s, p, got in zip(shards, paths, digests):
        if got != s["sha256"]:
            raise ShardError(f"shard {p} does not match the sha256 in {d / MANIFEST} (file "
                             f"{got[:16]}..., manifest {str(s['sha256'])[:16]}...): it changed "
                             f"after pre-tokenization; {_first_bad_record(p)}. Re-run "
                             f"fourm-pretokenize or restore the file")
    return dict(bytes=sum(int(s["bytes"]) for s in shards), seconds=time.perf_counter() - t0)


def open_shards(directory: str | os.PathLike, *, decode: bool = False, verify: bool = True):
    """(grain ArrayRecordDataSource over the shards, manifest); `decode=True` wraps it in
    `DecodedSource`. Checks that the manifest and the files agree (names inside the folder, sizes,
    record counts, and with `verify` the sha256 of every shard) and refuses shards the manifest
    does not list."""
    import grain
    from array_record.python.array_record_module import ArrayRecordReader

    d = Path(directory)
    manifest = read_manifest(d)
    listed = [str(s["file"]) for s in manifest["shards"]]
    unlisted = sorted(p.name for p in d.glob(f"*{SHARD_SUFFIX}") if p.name not in set(listed))
    if unlisted:
        raise ShardError(f"{d} has shard files not listed in its manifest: {unlisted} (left by "
                         f"another run?); remove them or re-run fourm-pretokenize")
    if not listed:
        raise ShardError(f"{d / MANIFEST} lists no shards")
    for s in manifest["shards"]:
        p = inside(d, s["file"], "shard file")
        if not p.is_file():
            raise FileNotFoundError(f"shard {p} listed in {d / MANIFEST} is missing")
        if p.stat().st_size != s["bytes"]:
            raise ShardError(f"shard {p} has {p.stat().st_size} bytes, manifest says {s['bytes']}")
        try:
            reader = ArrayRecordReader(str(p))
            n = reader.num_records()
            reader.close()
        except Exception as e:  # noqa: BLE001 - a damaged index; name the file
            raise ShardError(f"shard {p} does not read as ArrayRecord ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        if n != s["num_records"]:
            raise ShardError(f"shard {p} has {n} records, manifest says {s['num_records']}")
    if verify:
        verify_shards(d, manifest)
    raw = grain.sources.ArrayRecordDataSource([str(d / f) for f in listed])
    if len(raw) != manifest["num_records"]:
        raise ShardError(f"{d}: shards hold {len(raw)} records, manifest says {manifest['num_records']}")
    return (DecodedSource(raw) if decode else raw), manifest

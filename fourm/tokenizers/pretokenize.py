"""Pre-tokenization: a multimodal dataset -> ArrayRecord shards of per-sample token arrays.

The format (records, manifest, reading and verifying) lives in `fourm.data.shards`; this module
writes it. One ArrayRecord record = one sample; keys are registry modality names:

  grid modalities      ('tok_rgb@64', ...)   int16 [gh, gw] (int32 if the vocabulary needs it)
  pixel modalities     ('rgb@64')            uint8 [H, W, 3], the raw image
  sequence modalities  ('caption', 'det', 'metadata')  int32 [L], ids without PAD/SOS/EOS
  '_index'                                   int64 [], the sample's index in the source

The output directory holds `shard-KKKKK-of-NNNNN.array_record` files and, written last,
`manifest.json` (modalities, tokenizers with versions and config hashes, shard list with record
counts, sizes and sha256, source description). Crash safety: a shard is written under a temporary
name in `.work/` and renamed into place only once complete; a rerun skips shards that exist and
redoes the rest (`.work/run.json` guards against resuming with a different configuration); the
manifest is replaced atomically at the very end, so readers (`open_shards`) either see a complete
dataset or refuse it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue
import resource
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from fourm import modalities as registry
from fourm.data.augment import Augment, image_size
from fourm.data.shards import (FORMAT, MANIFEST, SHARD_SUFFIX, WRITER_OPTIONS, encode_record,
                               sha256_file, shard_name)
# Readers' names, kept importable from here for callers written before fourm.data.shards.
from fourm.data.shards import decode_record, open_shards, read_manifest  # noqa: F401
from fourm.io import atomic_write
from fourm.tokenizers import structure

WORK_DIR = ".work"


class ImageTokenizerLike(Protocol):
    """What pretokenize needs of an image tokenizer (`fourm.tokenizers.image.ImageTokenizer`)."""

    vocab_size: int
    config_hash: str
    version: Any

    def encode(self, batch: np.ndarray) -> np.ndarray: ...


# ------------------------------------------------------------------------------------ sample -> text
def _image_size(sample: Mapping[str, Any], default: int) -> tuple[int, int]:
    return image_size(sample) or (default, default)


def sample_text(source_field: str, sample: Mapping[str, Any], *, bins: int,
                default_size: int, strict_metadata: bool = True) -> str:
    """The text a sequence modality tokenizes, made from the sample's `source_field`."""
    if source_field not in sample and not (source_field == "palette" and "rgb" in sample):
        raise KeyError(f"sample has no field {source_field!r} (fields: {sorted(sample)})")
    layout = registry.field(source_field).layout if source_field in registry.field_names() else None
    if layout == "boxes":  # by layout: a registered field of boxes becomes text like "boxes"
        return structure.boxes_to_text(sample[source_field], _image_size(sample, default_size), bins)
    if layout == "json":
        return structure.metadata_to_text(sample[source_field], bins=bins, strict=strict_metadata)
    if source_field == "palette":
        pal = sample.get("palette")
        pal = structure.palette_from_image(np.asarray(sample["rgb"])) if pal is None else pal
        return structure.palette_to_text(pal, bins)
    value = sample[source_field]
    if isinstance(value, bytes):  # TFDS strings arrive as bytes
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"sample field {source_field!r} should be text, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------ plan
def _tokenizer_info(tok, path: str | None = None) -> dict:
    info = dict(name=getattr(tok, "name", type(tok).__name__), version=str(getattr(tok, "version", "")),
                config_hash=str(getattr(tok, "config_hash", "")), vocab_size=int(tok.vocab_size))
    if path:
        info["path"] = str(path)
    return info


def _modality_specs(names: Sequence[str], image_tokenizers: Mapping[str, Any], text_tokenizer,
                    family: str, paths: Mapping[str, str]) -> dict[str, dict]:
    specs = {}
    for name in names:
        m = registry.get(name, family)
        spec: dict[str, Any] = dict(kind=m.kind, source=m.source)
        if m.kind == "grid":
            if name not in image_tokenizers:
                raise ValueError(f"modality {name!r} needs an image tokenizer; none given "
                                 f"(have tokenizers for {sorted(image_tokenizers)})")
            tok = image_tokenizers[name]
            spec.update(shape=list(m.grid), dtype="int16" if tok.vocab_size <= 2 ** 15 else "int32",
                        vocab_size=int(tok.vocab_size), registry_vocab_size=m.vocab_size,
                        tokenizer=_tokenizer_info(tok, paths.get(name)))
        elif m.kind == "pixels":
            side = m.grid[0] * m.patch_size, m.grid[1] * m.patch_size
            spec.update(shape=[side[0], side[1], m.channels], dtype="uint8")
        else:
            if text_tokenizer is None:
                raise ValueError(f"modality {name!r} needs the text tokenizer; none given")
            spec.update(dtype="int32", vocab_size=int(text_tokenizer.vocab_size),
                        registry_vocab_size=m.vocab_size, max_length=m.max_length,
                        tokenizer=_tokenizer_info(text_tokenizer, paths.get("text")))
        specs[name] = spec
    extra = sorted(set(image_tokenizers) - set(names))
    if extra:
        raise ValueError(f"image tokenizers given for {extra}, which are not in modalities {list(names)}")
    return specs


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]




# ------------------------------------------------------------------------------------ tokenizing
def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_batch(batch: Sequence[Mapping[str, Any]], specs: Mapping[str, dict],
                   image_tokenizers: Mapping[str, Any], text_tokenizer, *, batch_size: int,
                   default_size: int, strict_metadata: bool = True) -> list[dict[str, np.ndarray]]:
    """Token arrays of every modality for a list of samples (image tokenizers see full batches)."""
    n = len(batch)
    out: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for name, spec in specs.items():
        field = spec["source"]
        if spec["kind"] in ("grid", "pixels"):
            try:
                arrays = [np.asarray(s[field]) for s in batch]
            except KeyError:
                raise KeyError(f"modality {name!r}: sample has no field {field!r} "
                               f"(fields: {sorted(batch[0])})") from None
        if spec["kind"] == "grid":
            # Pad the last, short batch by repetition: one static shape = one jit compilation.
            stacked = np.stack(arrays + [arrays[-1]] * (batch_size - n))
            ids = np.asarray(image_tokenizers[name].encode(stacked))
            if ids.shape[1:] != tuple(spec["shape"]) or ids.shape[0] != batch_size:
                raise ValueError(f"tokenizer for {name!r} returned shape {ids.shape}, expected "
                                 f"[{batch_size}, {spec['shape'][0]}, {spec['shape'][1]}]")
            if ids.size and (ids.min() < 0 or ids.max() >= spec["vocab_size"]):
                raise ValueError(f"tokenizer for {name!r} returned ids outside [0, {spec['vocab_size']})")
            for i in range(n):
                out[i][name] = ids[i].astype(spec["dtype"])
        elif spec["kind"] == "pixels":
            for i, a in enumerate(arrays):
                if a.shape != tuple(spec["shape"]) or a.dtype != np.uint8:
                    raise ValueError(f"modality {name!r}: sample field {field!r} is {a.dtype} "
                                     f"{a.shape}, expected uint8 {tuple(spec['shape'])}")
                out[i][name] = a
        else:
            for i, s in enumerate(batch):
                text = sample_text(field, s, bins=text_tokenizer.value_bins, default_size=default_size,
                                   strict_metadata=strict_metadata)
                # Boxes/metadata may legitimately be empty (a scene without objects).
                ids = text_tokenizer.encode(text, allow_empty=field != "caption")
                out[i][name] = np.asarray(ids, np.int32)
    return out


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """`items` produced on a background thread, up to `depth` ahead, in order. Reading and
    decoding the next batch (Python, NumPy, image codecs) overlaps encoding this one (XLA's
    threads, which release the GIL): both cores stay busy even without worker processes. The
    producer's exceptions re-raise here; closing the generator early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((done, e))

    thread = threading.Thread(target=produce, name="pretokenize-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, err = q.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()


class _Fetch:
    """Picklable `indices -> [(index, sample)]` for worker processes (augmented in the worker,
    deterministically in (augment.seed, index))."""

    def __init__(self, source, augment: Augment | None = None):
        self.source, self.augment = source, augment

    def __call__(self, indices: Sequence[int]):
        if self.augment is None:
            return [(i, self.source[i]) for i in indices]
        return [(i, self.augment(self.source[i], i)) for i in indices]


def _sample_iter(source, indices: Sequence[int], pool, workers: int, chunk: int = 4,
                 augment: Augment | None = None) -> Iterator[dict]:
    """Samples in index order; with a pool, a bounded window of chunks is generated ahead."""
    fetch = _Fetch(source, augment)
    chunks = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
    if pool is None:
        results = map(fetch, chunks)
    else:
        def ahead():
            window = collections.deque()
            for c in chunks:
                window.append(pool.submit(fetch, c))
                # Bounded look-ahead: memory stays O(workers), not O(shard).
                if len(window) > 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        results = ahead()
    for part in results:
        for i, s in part:
            s = dict(s)
            s["_index"] = i
            yield s


# ------------------------------------------------------------------------------------ driver
def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pretokenize(source, out_dir: str | os.PathLike, *, modalities: Sequence[str],
                image_tokenizers: Mapping[str, ImageTokenizerLike] | None = None, text_tokenizer=None,
                shard_size: int = 1000, batch_size: int = 32, workers: int = 0,
                source_info: Mapping[str, Any] | None = None,
                tokenizer_paths: Mapping[str, str] | None = None, family: str = "fourm",
                default_size: int = 64, strict_metadata: bool = True, overwrite: bool = False,
                progress: bool = True, augment: Augment | None = None,
                fail_after_shards: int | None = None) -> dict:
    """Tokenize every sample of `source` (len + random access) into shards; returns the manifest.

    `fail_after_shards` stops (raising RuntimeError) after writing that many shards in this call:
    a test hook that simulates a killed run. `strict_metadata=False` drops metadata fields that
    `structure.METADATA_SPEC` does not know instead of failing.
    """
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    image_tokenizers = dict(image_tokenizers or {})
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    specs = _modality_specs(list(modalities), image_tokenizers, text_tokenizer, family,
                            dict(tokenizer_paths or {}))
    total = len(source)
    if total == 0:
        raise ValueError("the source has no samples")
    num_shards = -(-total // shard_size)
    out = Path(out_dir)
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    run = dict(format=FORMAT, source=dict(source_info or {}), num_samples=total,
               shard_size=shard_size, modalities=specs,
               value_bins=getattr(text_tokenizer, "value_bins", None), strict_metadata=strict_metadata,
               metadata_spec=_fingerprint({k: vars(v) for k, v in structure.METADATA_SPEC.items()}))
    if augment is not None:  # (absent, not None, without it: fingerprints of earlier runs hold)
        run["augment"] = dataclasses.asdict(augment)
    # Tokenizer identity is (version, config_hash); where a tokenizer lives does not matter.
    fingerprint = _fingerprint(dict(run, modalities={
        n: {k: v for k, v in s.items() if k != "tokenizer"} | dict(tokenizer={
            k: v for k, v in s.get("tokenizer", {}).items() if k != "path"})
        for n, s in specs.items()}))
    run_file = work / "run.json"
    if run_file.exists():
        old = json.loads(run_file.read_text()).get("fingerprint")
        if old != fingerprint and not overwrite:
            raise ValueError(f"{out} holds shards of a different pre-tokenization run (fingerprint "
                             f"{old} != {fingerprint}: other source, tokenizers or shard size); use "
                             f"a new out_dir or overwrite=True")
    if overwrite or not run_file.exists():
        for p in list(out.glob(f"*{SHARD_SUFFIX}")) + list(work.glob("*")) + [out / MANIFEST]:
            p.unlink(missing_ok=True)
    for p in work.glob(".*.tmp-*"):  # leftovers of a killed run
        p.unlink()
    atomic_write(run_file, json.dumps(dict(run, fingerprint=fingerprint), indent=2, default=str))

    todo = []
    for k in range(num_shards):
        lo, hi = k * shard_size, min((k + 1) * shard_size, total)
        path = out / shard_name(k, num_shards)
        if path.exists() and (work / f"{path.name}.json").exists():
            got = ArrayRecordReader(str(path)).num_records()
            if got != hi - lo:
                raise ValueError(f"existing shard {path} has {got} records, expected {hi - lo}; "
                                 f"delete it to have it rewritten")
            continue
        todo.append((k, lo, hi, path))
    done_samples = total - sum(hi - lo for _, lo, hi, _ in todo)

    pool = None
    if workers > 0 and todo:
        # spawn, not fork: the parent holds JAX runtime threads, which fork would clone broken.
        # Spawned workers start bare: they import the user's registration modules first.
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=registry.load_modules,
                                      initargs=(registry.loaded_modules(),))
    bar = tqdm(total=total, initial=done_samples, unit="sample", desc="pretokenize",
               disable=not progress)
    t0, cpu0, processed = time.perf_counter(), _cpu_seconds(), 0
    try:
        for written, (k, lo, hi, path) in enumerate(todo):
            if fail_after_shards is not None and written >= fail_after_shards:
                raise RuntimeError(f"stopped after {written} shards (fail_after_shards)")
            tmp = work / f".{path.name}.tmp-{os.getpid()}"
            writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
            lengths: dict[str, list[int]] = {n: [] for n, s in specs.items() if s["kind"] == "sequence"}
            try:
                batches = _batches(_sample_iter(source, range(lo, hi), pool, workers,
                                                augment=augment), batch_size)
                for batch in prefetch(batches):
                    records = tokenize_batch(batch, specs, image_tokenizers, text_tokenizer,
                                             batch_size=batch_size, default_size=default_size,
                                             strict_metadata=strict_metadata)
                    for sample, rec in zip(batch, records):
                        for n in lengths:
                            lengths[n].append(int(rec[n].shape[0]))
                        rec["_index"] = np.asarray(sample["_index"], np.int64)
                        writer.write(encode_record(rec))
                    bar.update(len(batch))
                    processed += len(batch)
            finally:
                writer.close()
            stats = dict(num_records=hi - lo, first_index=lo, lengths={
                n: dict(max=max(v, default=0), sum=sum(v),
                        over_max_length=sum(x > specs[n]["max_length"] for x in v))
                for n, v in lengths.items()})
            atomic_write(work / f"{path.name}.json", json.dumps(stats))
            os.replace(tmp, path)  # the shard becomes visible only when complete
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - t0
    rate = processed / seconds if seconds > 0 and processed else 0.0
    # Cores kept busy: CPU seconds of this process and its (finished) workers per wall second.
    busy = (_cpu_seconds() - cpu0) / seconds if seconds > 0 and processed else 0.0

    shards, seq = [], {n: dict(max=0, sum=0, over_max_length=0) for n, s in specs.items()
                       if s["kind"] == "sequence"}
    for k in range(num_shards):
        path = out / shard_name(k, num_shards)
        st = json.loads((work / f"{path.name}.json").read_text())
        for n, v in st["lengths"].items():
            seq[n] = dict(max=max(seq[n]["max"], v["max"]), sum=seq[n]["sum"] + v["sum"],
                          over_max_length=seq[n]["over_max_length"] + v["over_max_length"])
        shards.append(dict(file=path.name, num_records=st["num_records"],
                           first_index=st["first_index"], bytes=path.stat().st_size,
                           sha256=sha256_file(path)))
    for n, v in seq.items():
        specs[n]["lengths"] = dict(max=v["max"], mean=v["sum"] / total,
                                   over_max_length=v["over_max_length"])
    manifest = dict(format=FORMAT, fingerprint=fingerprint, num_records=total,
                    modalities=specs, source=run["source"], shards=shards,
                    text=None if text_tokenizer is None else dict(
                        value_bins=text_tokenizer.value_bins,
                        num_sentinels=text_tokenizer.num_sentinels),
                    benchmark=dict(samples=processed, seconds=round(seconds, 3),
                                   samples_per_second=round(rate, 2), workers=workers,
                                   cores_busy=round(busy, 2), cores=os.cpu_count(),
                                   batch_size=batch_size))
    if augment is not None:
        manifest["augment"] = run["augment"]
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest

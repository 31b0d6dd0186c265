"""The grain input pipeline: pre-tokenized ArrayRecord shards -> masked, batched, per-process data.

    source (random access, one record per scene: `fourm.data.shards.open_shards`, checked
            against the manifest's sha256 before the first step)
      -> shuffle(seed), reshuffled each epoch, repeated forever
      -> decode record bytes -> {modality: tokens}
      -> masking transform (random map: rng from (seed, global example index))
      -> this process's rows of each global batch
      -> batch(global_batch / process_count)
      -> threads / worker processes (prefetch)

Why rows of the global batch rather than contiguous shards of the records: global example `i` is
the same scene with the same masks whatever the number of processes, so a 2-host run sees exactly
the batches of a 1-host run (tested), and the data order is a pure function of (seed, step). The
random map sits before the row selection so its rng is keyed by the global index.

`global_batch_array` turns the per-process numpy batch into global jax.Arrays with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

import grain
import jax
import numpy as np


class ProcessRows(grain.MapDataset):
    """Element j of a process = parent element (j // b) * B + offset + j % b, b = B / processes:
    the process's block of rows [offset, offset + b) of every global batch."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_count: int,
                 row_offset: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by the "
                             f"{process_count} processes")
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = int(row_offset)

    def __len__(self) -> int:
        n = len(self._parent)
        return sys.maxsize if n >= sys.maxsize else (n // self._global) * self._local

    def __str__(self) -> str:
        return f"ProcessRows(offset={self._offset}, local={self._local}, global={self._global})"

    def _index(self, j: int) -> int:
        step, r = divmod(j, self._local)
        return step * self._global + self._offset + r

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._index(index)]


def build_dataset(source: Any, *, transform: Any, seed: int, global_batch: int,
                  decode: Callable[[Any], Mapping[str, np.ndarray]] | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  row_offset: int | None = None, start_step: int = 0, shuffle: bool = True,
                  repeat: bool = True) -> grain.MapDataset:
    """Per-process MapDataset of batches (dicts of numpy arrays with leading dim B / processes).

    `row_offset`: first global batch row of this process (from `process_rows` of the batch
    sharding); default process_index * B / processes.

    `start_step` positions the pipeline (used when a checkpoint has no iterator state for this
    process layout); normally the grain iterator state restores the position instead.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()  # reseeds the shuffle and the masking rng every epoch
    if decode is not None:
        ds = ds.map(decode)
    if transform is not None:
        ds = ds.random_map(transform)
    if row_offset is None:
        row_offset = pi * (global_batch // pc)
    ds = ProcessRows(ds, global_batch, pc, row_offset)
    ds = ds.batch(global_batch // pc, drop_remainder=True)
    if start_step:
        ds = ds[start_step:]
    return ds


def to_iterator(ds: grain.MapDataset, *, num_workers: int = 0, num_threads: int = 2,
                prefetch: int = 4) -> grain.DatasetIterator:
    """Checkpointable iterator; `num_workers` > 0 moves the per-example work to processes."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use, tests)
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """[start, stop) of the global batch rows this process's devices hold under `sharding`.

    The input pipeline loads exactly these rows, so no example crosses hosts. Raises if they are
    not one contiguous block (a mesh whose batch axes interleave processes)."""
    shape = (global_batch, *([1] * (len(sharding.spec) - 1)))
    starts, stops = [], []
    for idx in sharding.addressable_devices_indices_map(shape).values():
        rows = idx[0]
        starts.append(rows.start or 0)
        stops.append(global_batch if rows.stop is None else rows.stop)
    lo, hi = min(starts), max(stops)
    if (hi - lo) * jax.process_count() != global_batch:
        raise ValueError(f"this process's devices hold batch rows {sorted(set(zip(starts, stops)))}, "
                         f"not one block of {global_batch // jax.process_count()}: order the mesh so "
                         f"each process's devices are adjacent along the batch axes")
    return lo, hi


def global_batch_array(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any],
                       row_offset: int) -> dict:
    """Per-process numpy batch (global rows row_offset..) -> global jax.Arrays.

    Each device gets its own numpy slice (a host-to-device copy of just that slice); unlike
    `jax.make_array_from_process_local_data` this compiles nothing per key and shape."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        sh = shardings[k]
        global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
        arrays = []
        for device, idx in sh.addressable_devices_indices_map(global_shape).items():
            rows = idx[0]
            lo = (rows.start or 0) - row_offset
            hi = (global_shape[0] if rows.stop is None else rows.stop) - row_offset
            arrays.append(jax.device_put(v[(slice(lo, hi), *idx[1:])], device))
        out[k] = jax.make_array_from_single_device_arrays(global_shape, sh, arrays)
    return out


def batch_shardings(mesh: jax.sharding.Mesh, example: Mapping[str, np.ndarray],
                    batch_axes: tuple[str, ...] = ("data", "fsdp")) -> dict:
    """Shard the leading (batch) dim over the data-parallel axes, replicate the rest."""
    P = jax.sharding.PartitionSpec
    return {k: jax.sharding.NamedSharding(mesh, P(batch_axes, *([None] * (np.ndim(v) - 1))))
            for k, v in example.items()}

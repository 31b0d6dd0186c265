"""Host-side checks of a masked batch against a model (the cheap place for value checks).

Inside jit the model clips out-of-range ids and positions (it cannot raise on values), so the data
path calls `validate_batch` (numpy, before device transfer; e.g. on the first batches, or always
in tests and tools) to turn bad values into errors that say what is wrong and where.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fourm.batch import PIXELS_PREFIX
from fourm.model.embeddings import pos_table_len
from fourm.model.fourm_model import BatchError, check_batch_shapes
from fourm.model.spec import ModelSpec


def validate_batch(spec: ModelSpec, batch: Mapping[str, Any]) -> None:
    """Raise BatchError for keys/shapes that disagree with the model, unknown modality indices,
    a modality on the wrong side, ids outside a modality's vocabulary, positions outside its
    token grid / position table, or more slots of a modality than it has tokens."""
    check_batch_shapes(spec, batch, decoder=False)
    check_batch_shapes(spec, batch, decoder=True)
    known = set(f"{p}_{k}" for p in ("enc", "dec") for k in ("ids", "mod", "pos", "valid")) | {
        "dec_targets", "dec_loss"}
    extra = sorted(k for k in batch if k not in known and not k.startswith(PIXELS_PREFIX))
    if extra:
        raise BatchError(f"batch has unknown keys {extra} (see fourm.batch)")
    pixel_keys = {PIXELS_PREFIX + spec.modalities[i].name for i in spec.inputs
                  if spec.modalities[i].kind == "pixels"}
    stray = sorted(k for k in batch if k.startswith(PIXELS_PREFIX) and k not in pixel_keys)
    if stray:
        raise BatchError(f"batch has pixel inputs {stray} for modalities the model does not take as "
                         f"pixel inputs; model inputs: {list(spec.domains_in)}")
    sides = (("enc", spec.inputs, ("enc_ids",)), ("dec", spec.targets, ("dec_ids", "dec_targets")))
    for side, allowed, id_keys in sides:
        mod = np.asarray(batch[f"{side}_mod"])
        pos = np.asarray(batch[f"{side}_pos"])
        valid = np.asarray(batch[f"{side}_valid"]).astype(bool)
        used = np.unique(mod[valid])
        bad = [int(i) for i in used if i < 0 or i >= len(spec.modalities)]
        if bad:
            raise BatchError(f"batch[{side}_mod] has modality indices {bad}; the model has "
                             f"{len(spec.modalities)} modalities {list(spec.names)}")
        wrong = [spec.modalities[int(i)].name for i in used if int(i) not in allowed]
        if wrong:
            what = "encoder inputs" if side == "enc" else "decoder targets"
            names = spec.domains_in if side == "enc" else spec.domains_out
            raise BatchError(f"batch[{side}_mod] uses {wrong} as {what}, but the model's {what} are {list(names)}")
        for i in used:
            m = spec.modalities[int(i)]
            sel = valid & (mod == i)
            limit = pos_table_len(m, spec.seq_pos_len)
            p = pos[sel]
            if p.min() < 0 or p.max() >= limit:
                raise BatchError(f"batch[{side}_pos] for {m.name!r} spans [{p.min()}, {p.max()}], outside "
                                 f"[0, {limit})")
            per_sample = sel.sum(1).max()
            if m.kind != "sequence" and per_sample > m.num_tokens:
                raise BatchError(f"batch has {per_sample} {side} slots of {m.name!r} in one sample, more "
                                 f"than its {m.num_tokens} tokens (budget larger than the modality)")
            if m.kind == "pixels":
                continue
            for k in id_keys:
                if k == "dec_ids" and m.kind != "sequence":
                    continue  # grid targets are fed the mask token; dec_ids is ignored there
                v = np.asarray(batch[k])[sel]
                if v.min() < 0 or v.max() >= m.vocab_size:
                    raise BatchError(f"batch[{k!r}] has ids in [{v.min()}, {v.max()}] for {m.name!r}, "
                                     f"outside its vocabulary [0, {m.vocab_size})")
    for k in pixel_keys:
        arr = np.asarray(batch[k])
        if not np.issubdtype(arr.dtype, np.floating):
            raise BatchError(f"batch[{k!r}] must be a float image (normalised), got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise BatchError(f"batch[{k!r}] has non-finite values")

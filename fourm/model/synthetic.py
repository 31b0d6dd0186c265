"""Synthetic masked batches with 4M's structure, for tests and benchmarks (no data needed).

Per sample, a Dirichlet(1) draw splits the input and the target budget over the model's input
and target modalities; grid positions are a random subset, sequences take a prefix; ids are
uniform over each vocabulary. Layout and dtypes follow `fourm.batch` exactly.
"""

from __future__ import annotations

import numpy as np


def synthetic_batch(spec, batch: int, n_in: int, n_tgt: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A masked batch as fourm.masking produces it: per-sample Dirichlet budgets, modality blocks."""
    rng = np.random.default_rng(seed)
    mods = spec.modalities
    out = {k: np.zeros((batch, n_in), np.int32) for k in ("enc_ids", "enc_mod", "enc_pos")}
    out.update({k: np.zeros((batch, n_tgt), np.int32) for k in ("dec_ids", "dec_targets", "dec_mod", "dec_pos")})
    out["enc_valid"] = np.zeros((batch, n_in), bool)
    out["dec_valid"] = np.zeros((batch, n_tgt), bool)
    for i in spec.inputs:
        m = mods[i]
        if m.kind == "pixels":
            side = m.grid[0] * m.patch_size
            out["pixels/" + m.name] = rng.normal(size=(batch, side, side, m.channels)).astype(np.float32)
    for b in range(batch):
        for key, idx, total in (("enc", spec.inputs, n_in), ("dec", spec.targets, n_tgt)):
            share = rng.dirichlet(np.ones(len(idx)))
            counts = np.floor(share * total).astype(int)
            counts[np.argmax(share)] += total - counts.sum()
            s = 0
            for i, c in zip(idx, counts):
                m = mods[i]
                c = min(int(c), m.num_tokens - 1)
                pos = np.arange(c) if m.kind == "sequence" else np.sort(rng.choice(m.num_tokens, c, replace=False))
                vocab = max(m.vocab_size, 1)
                tokens = rng.integers(0, vocab, c + 1)
                sl = slice(s, s + c)
                out[f"{key}_mod"][b, sl], out[f"{key}_pos"][b, sl], out[f"{key}_valid"][b, sl] = i, pos, True
                if key == "enc":
                    out["enc_ids"][b, sl] = tokens[:c] if m.kind != "pixels" else 0
                elif m.kind == "sequence":  # teacher forcing: slot t reads token t, predicts t + 1
                    out["dec_ids"][b, sl], out["dec_targets"][b, sl] = tokens[:c], tokens[1:]
                else:  # grid targets: the model feeds its mask token; dec_ids stays 0
                    out["dec_targets"][b, sl] = tokens[:c]
                s += c
    out["dec_loss"] = out["dec_valid"].copy()
    return out

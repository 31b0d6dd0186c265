"""`MaskingTransform`: one sample's per-modality tokens -> the fixed-length masked batch.

Per sample (all numpy, CPU, inside the input pipeline):
1. check every configured modality is there with the right shape, dtype and id range;
2. pick a mixture component, split the input budget across modalities (Dirichlet + `allocate`);
3. span-mask sequences within their input share; what they leave unused goes to image modalities;
4. split the target budget the same way: images take positions disjoint from their inputs,
   sequences crop their target to their share (4M's rule), leftovers go to image modalities;
5. write `fourm.batch`'s arrays: `N_enc = input_budget`, `N_dec = target_budget` slots, modality
   order then ascending position, padding at the end.

So every sample has the same keys, shapes and dtypes and the model compiles once. Budgets are
met exactly whenever the component's modalities can hold them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import grain
import ml_collections
import numpy as np

from fourm import modalities as modreg
from fourm.batch import DEC_KEYS, ENC_KEYS, PIXELS_PREFIX, normalise_pixels
from fourm.masking import budgets, spans


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """What one call drew: the mixture component, slots per modality, uncropped sequence targets."""

    component: int
    num_inputs: dict[str, int]
    num_targets: dict[str, int]  # decoder slots (a sequence target of T tokens uses T - 1)
    full_targets: dict[str, np.ndarray]  # sequence modalities: the whole span target before cropping


class MaskingInputError(ValueError):
    """A sample does not match the configured modalities (names the modality and field)."""


class MaskingTransform:
    """4M's multimodal masking as a per-sample numpy transform: `transform(sample, rng) -> dict`.

    Args:
      modalities: Modality entries (or registry names) in the model's modality order.
      input_budget / target_budget: encoder / decoder slots per sample (N_enc / N_dec).
      mixture: preset names ("all2all,rgb2all"; any "<modality or source>2all", e.g.
        "caption2all": the whole input from it), a list of `MixtureComponent`, or 4M's
        per-modality alpha mapping `{mod: {input_alphas, target_alphas, keep}}`.
      alpha, keep: Dirichlet alpha and sequence keep scheme of the presets.
      weights: mixture component weights (None = uniform); ignored for `MixtureComponent`s.
      input_only / target_only: modality names restricted to one side (pixels are input-only).
      chunk_start_range: ids [lo, hi) that start a metadata chunk in a flat `chunk` sequence.
      redistribute: give input/target slots a sequence did not use to image modalities.
      strict_budgets: fail when a component's modalities can never hold a budget.
      strict_keys: fail on sample keys that are not configured modalities.
    """

    def __init__(self, modalities: Sequence[modreg.Modality | str], input_budget: int,
                 target_budget: int, mixture="all2all,rgb2all", *, alpha: float = 0.5,
                 keep: str = "random", weights: Sequence[float] | None = None,
                 input_only: Sequence[str] = (),
                 target_only: Sequence[str] = (), chunk_start_range: tuple[int, int] | None = None,
                 redistribute: bool = True, strict_budgets: bool = True, strict_keys: bool = True):
        self.modalities = [modreg.get(m) if isinstance(m, str) else m for m in modalities]
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"masking needs distinct modality names, got {names}")
        self.names = names
        self.input_budget, self.target_budget = int(input_budget), int(target_budget)
        if self.input_budget < 1 or self.target_budget < 0:
            raise ValueError(f"input_budget must be >= 1 and target_budget >= 0, "
                             f"got {input_budget} and {target_budget}")
        self.input_only, self.target_only = tuple(input_only), tuple(target_only)
        for role, group in (("input_only", self.input_only), ("target_only", self.target_only)):
            if set(group) - set(names):
                raise ValueError(f"{role} names unknown modalities {sorted(set(group) - set(names))}; "
                                 f"configured: {names}")
        if set(self.input_only) & set(self.target_only):
            raise ValueError(f"modalities both input_only and target_only: "
                             f"{sorted(set(self.input_only) & set(self.target_only))}")
        self.chunk_start_range = tuple(int(v) for v in chunk_start_range) if chunk_start_range else None
        self.redistribute, self.strict_keys = bool(redistribute), bool(strict_keys)
        for m in self.modalities:
            self._check_modality(m)

        self.components = self._build_mixture(mixture, alpha, keep, weights)
        self._cum_w = np.cumsum(budgets.validate_mixture(self.components, self.modalities,
                                                         self.input_only, self.target_only))
        self._alpha_in = [np.array(c.input_alphas) for c in self.components]
        self._alpha_t = [np.array(c.target_alphas) for c in self.components]
        self._num_tokens = np.array([m.num_tokens for m in self.modalities], np.int64)
        self._is_image = np.array([m.is_image_like for m in self.modalities])
        if strict_budgets:
            self._check_capacity()

    # --------------------------------------------------------------------------------------------
    # construction-time checks
    # --------------------------------------------------------------------------------------------
    def _check_modality(self, m: modreg.Modality) -> None:
        if m.kind == "sequence":
            if m.masking not in ("span", "chunk"):
                raise ValueError(f"sequence modality {m.name!r} needs masking 'span' or 'chunk', got {m.masking!r}")
            if not m.max_length or m.max_length < 1:
                raise ValueError(f"sequence modality {m.name!r} needs max_length >= 1, got {m.max_length}")
            need = spans.max_sentinels_needed(m.max_length)
            s = m.text
            if need >= s.num_sentinels:
                raise ValueError(f"{m.name!r} (max_length {m.max_length}) can need sentinel [S_{need}], "
                                 f"but its text layout has num_sentinels {s.num_sentinels}")
            if s.sentinel(need) >= m.vocab_size or max(s.pad_id, s.eos_id) >= m.vocab_size:
                raise ValueError(f"{m.name!r}: vocab_size {m.vocab_size} cannot hold the special ids "
                                 f"(sentinels up to {s.sentinel(need)})")
        elif m.kind in ("grid", "pixels"):
            if not m.grid or m.masking != "grid":
                raise ValueError(f"image-like modality {m.name!r} needs a grid and masking 'grid'")
            if m.kind == "pixels" and (not m.patch_size or m.channels != 3):
                raise ValueError(f"pixel modality {m.name!r} needs patch_size and 3 channels "
                                 f"(ImageNet normalisation), got {m.patch_size}, {m.channels}")
            if m.kind == "grid" and m.vocab_size < 1:
                raise ValueError(f"grid modality {m.name!r} has vocab_size {m.vocab_size}")
        else:
            raise ValueError(f"modality {m.name!r} has unknown kind {m.kind!r}")

    def _build_mixture(self, mixture, alpha, keep, weights) -> list[budgets.MixtureComponent]:
        if isinstance(mixture, str):
            presets = [p.strip() for p in mixture.split(",") if p.strip()]
            w = list(weights) if weights else [1.0] * len(presets)
            if len(w) != len(presets):
                raise ValueError(f"masking weights {w} do not match mixture presets {presets}")
            return [budgets.preset_component(p, self.modalities, float(alpha), keep,
                                             self.input_only, self.target_only, wi)
                    for p, wi in zip(presets, w)]
        if isinstance(mixture, Mapping):
            return budgets.mixture_from_alphas(mixture, self.modalities, weights)
        return list(mixture)

    def _check_capacity(self) -> None:
        # Upper bounds: an image holds num_tokens; a sequence at most max_length input tokens
        # and max_length + 1 target slots (every token masked, plus its sentinel).
        cap_in = [m.num_tokens for m in self.modalities]
        cap_t = [m.num_tokens + (m.kind == "sequence") for m in self.modalities]
        for c, a_in, a_t in zip(self.components, self._alpha_in, self._alpha_t):
            for side, budget, alphas, caps in (("input", self.input_budget, a_in, cap_in),
                                               ("target", self.target_budget, a_t, cap_t)):
                room = budgets.static_capacity(alphas, caps)
                if budget > room:
                    parts = {n: k for n, a, k in zip(self.names, alphas, caps) if a > 0}
                    raise ValueError(
                        f"mixture component {c.name!r} can place at most {room} {side} tokens "
                        f"({parts}) but {side}_budget is {budget}; lower the budget, change the "
                        f"alphas, or pass strict_budgets=False to pad instead")

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, modalities) -> "MaskingTransform":
        """Build from the `masking` sub-config of `default_config()`."""
        mixture = cfg.alphas.to_dict() if cfg.get("alphas") is not None else cfg.mixture
        return cls(modalities, cfg.input_budget, cfg.target_budget, mixture, alpha=cfg.alpha,
                   keep=cfg.keep, weights=[float(w) for w in cfg.weights] or None,
                   input_only=tuple(cfg.input_only),
                   target_only=tuple(cfg.target_only),
                   chunk_start_range=tuple(int(v) for v in cfg.chunk_start_range) or None,
                   redistribute=cfg.redistribute, strict_budgets=cfg.strict_budgets,
                   strict_keys=cfg.strict_keys)

    # --------------------------------------------------------------------------------------------
    # sample checks (cheap: shapes, dtypes, min/max ids)
    # --------------------------------------------------------------------------------------------
    def _grid_tokens(self, m, x) -> np.ndarray:
        x = np.asarray(x)
        gh, gw = m.grid
        if x.shape not in ((gh, gw), (gh * gw,)):
            raise MaskingInputError(f"{m.name}: token grid must have shape ({gh}, {gw}) or "
                                    f"({gh * gw},), got {x.shape}")
        if not np.issubdtype(x.dtype, np.integer):
            raise MaskingInputError(f"{m.name}: token ids must be integers, got dtype {x.dtype}")
        x = x.reshape(-1)
        lo, hi = x.min(), x.max()
        if lo < 0 or hi >= m.vocab_size:
            bad = int(lo if lo < 0 else hi)
            raise MaskingInputError(f"{m.name}: token id {bad} at position "
                                    f"{int(np.flatnonzero(x == bad)[0])} is outside the vocabulary "
                                    f"[0, {m.vocab_size})")
        return x.astype(np.int32, copy=False)

    def _pixels(self, m, x) -> np.ndarray:
        x = np.asarray(x)
        want = (m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, m.channels)
        if x.shape != want:
            raise MaskingInputError(f"{m.name}: pixels must have shape (H, W, C) = {want}, got {x.shape}")
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise MaskingInputError(f"{m.name}: pixels must be uint8 [0, 255] or float [0, 1], "
                                    f"got dtype {x.dtype}")
        return normalise_pixels(x)

    def _sequence(self, m, x) -> tuple[np.ndarray, np.ndarray]:
        """(tokens incl. EOS, unit index per token), truncated to max_length as 4M does."""
        if m.masking == "chunk" and isinstance(x, (list, tuple)):
            chunks = [self._ids(m, c, f"chunk {j}") for j, c in enumerate(x)]
            tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
            unit = np.repeat(np.arange(len(chunks)), [len(c) for c in chunks])
        else:
            tokens = self._ids(m, x, "ids")
            if m.masking == "chunk" and self.chunk_start_range is None:
                raise MaskingInputError(f"{m.name}: chunk masking of a flat id array needs "
                                        f"chunk_start_range (ids that start a chunk), or pass the "
                                        f"chunks as a list of arrays")
            unit = spans.units_from_flat(tokens, self.chunk_start_range if m.masking == "chunk" else None)
        return spans.truncate_units(tokens, unit, m.text.eos_id, m.max_length)

    def _ids(self, m, x, field) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 1:
            raise MaskingInputError(f"{m.name}: {field} must be a 1-D id array (no padding), got shape {x.shape}")
        if x.size == 0:
            return np.zeros(0, np.int32)
        if not np.issubdtype(x.dtype, np.integer):
            raise MaskingInputError(f"{m.name}: {field} must be integers, got dtype {x.dtype}")
        lo, hi = x.min(), x.max()
        if lo < 0 or hi >= m.vocab_size:
            raise MaskingInputError(f"{m.name}: {field} contain id {int(lo if lo < 0 else hi)} outside "
                                    f"the vocabulary [0, {m.vocab_size})")
        reserved = m.text.is_reserved(x)
        if reserved.any():
            j = int(np.flatnonzero(reserved)[0])
            raise MaskingInputError(f"{m.name}: {field}[{j}] = {int(x[j])} is a special id (PAD/SOS/EOS "
                                    f"or a sentinel); give raw text ids, masking adds EOS and sentinels")
        return x.astype(np.int32, copy=False)

    def _check_keys(self, sample) -> None:
        if not isinstance(sample, Mapping):
            raise MaskingInputError(f"a sample must be a dict modality -> array, got {type(sample).__name__}")
        missing = [n for n in self.names if n not in sample]
        if missing:
            raise MaskingInputError(f"sample is missing modalities {missing} (has {sorted(sample)})")
        if self.strict_keys and len(sample) != len(self.names):
            extra = sorted(set(sample) - set(self.names))
            raise MaskingInputError(f"sample has unknown modalities {extra}; configured: {self.names} "
                                    f"(strict_keys=False drops unknown keys)")

    # --------------------------------------------------------------------------------------------
    # the transform
    # --------------------------------------------------------------------------------------------
    def __call__(self, sample: Mapping, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.apply(sample, rng)[0]

    def apply(self, sample: Mapping, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], MaskInfo]:
        """The masked sample plus what was drawn (for tests, statistics and debugging)."""
        self._check_keys(sample)
        grid_tokens, seqs, pixels = {}, {}, {}
        for i, m in enumerate(self.modalities):
            if m.kind == "grid":
                grid_tokens[i] = self._grid_tokens(m, sample[m.name])
            elif m.kind == "pixels":
                pixels[PIXELS_PREFIX + m.name] = self._pixels(m, sample[m.name])
            else:
                seqs[i] = self._sequence(m, sample[m.name])

        k = min(int(np.searchsorted(self._cum_w, rng.random(), side="right")), len(self.components) - 1)
        comp = self.components[k]

        # Inputs. A sequence can take at most its whole text (no sentinel when nothing is masked).
        cap_in = self._num_tokens.copy()
        for i, (tokens, _) in seqs.items():
            cap_in[i] = len(tokens)
        p_in = budgets.draw_proportions(self._alpha_in[k], rng)
        n_in = budgets.allocate(self.input_budget, p_in, cap_in, rng)
        seq_in, seq_tgt = {}, {}
        for i, (tokens, unit) in seqs.items():
            unit_len = np.bincount(unit, minlength=int(unit[-1]) + 1 if len(unit) else 0)
            b = int(n_in[i])
            kept = spans.choose_kept_units(unit_len, b, spans.keep_prob(comp.keep[i], rng), rng)
            seq_in[i], seq_tgt[i] = spans.span_mask(tokens, unit, kept, self.modalities[i].text,
                                                          empty_input=b == 0)
            n_in[i] = len(seq_in[i])
        self._top_up(n_in, self.input_budget, p_in, self._num_tokens - n_in, rng)

        # Targets: images use positions their inputs left free; a sequence target of T tokens
        # gives T - 1 predictions (teacher forcing), so that is its slot cost.
        cap_t = np.where(self._is_image, self._num_tokens - n_in, 0)
        for i, tgt in seq_tgt.items():
            cap_t[i] = len(tgt) - 1
        p_t = budgets.draw_proportions(self._alpha_t[k], rng)
        n_t = budgets.allocate(self.target_budget, p_t, cap_t, rng)
        full_tgt = dict(seq_tgt)
        for i in seqs:
            seq_tgt[i] = spans.crop_target(seq_tgt[i], int(n_t[i]), self.modalities[i].text, rng)
            n_t[i] = max(len(seq_tgt[i]) - 1, 0)
        self._top_up(n_t, self.target_budget, p_t, self._num_tokens - n_in - n_t, rng)

        out = self._assemble(grid_tokens, seq_in, seq_tgt, pixels, n_in, n_t, rng)
        info = MaskInfo(k, dict(zip(self.names, n_in.tolist())), dict(zip(self.names, n_t.tolist())),
                        {self.names[i]: t for i, t in full_tgt.items()})
        return out, info

    def _top_up(self, counts, budget, p, room, rng) -> None:
        """Give slots sequences left unused to image modalities of the same component (in place)."""
        left = budget - int(counts.sum())
        if self.redistribute and left > 0:
            counts += budgets.allocate(left, np.where(self._is_image, p, 0.0),
                                       np.where(self._is_image, room, 0), rng)

    def _assemble(self, grid_tokens, seq_in, seq_tgt, pixels, n_in, n_t, rng) -> dict[str, np.ndarray]:
        n_enc, n_dec = self.input_budget, self.target_budget
        enc_ids, enc_mod, enc_pos = (np.zeros(n_enc, np.int32) for _ in range(3))
        dec_ids, dec_tgt, dec_mod, dec_pos = (np.zeros(n_dec, np.int32) for _ in range(4))
        e = d = 0
        for i, m in enumerate(self.modalities):
            if m.kind == "sequence":
                inp, tgt = seq_in[i], seq_tgt[i]
                a, s = len(inp), max(len(tgt) - 1, 0)
                enc_ids[e:e + a], enc_pos[e:e + a] = inp, np.arange(a)
                if s:
                    dec_ids[d:d + s], dec_tgt[d:d + s], dec_pos[d:d + s] = tgt[:-1], tgt[1:], np.arange(s)
            else:
                a, s = int(n_in[i]), int(n_t[i])
                if a + s:
                    # One permutation: its head is the input set, the next `s` the target set, so
                    # they are disjoint by construction.
                    perm = rng.permutation(int(self._num_tokens[i]))
                    in_pos, t_pos = np.sort(perm[:a]), np.sort(perm[a:a + s])
                    enc_pos[e:e + a], dec_pos[d:d + s] = in_pos, t_pos
                    if m.kind == "grid":
                        enc_ids[e:e + a] = grid_tokens[i][in_pos]
                        dec_tgt[d:d + s] = grid_tokens[i][t_pos]
                    # grid targets: dec_ids stays 0, the model feeds its mask token there
            enc_mod[e:e + a] = i
            dec_mod[d:d + s] = i
            e, d = e + a, d + s
        enc_valid = np.arange(n_enc) < e
        dec_valid = np.arange(n_dec) < d
        out = dict(enc_ids=enc_ids, enc_mod=enc_mod, enc_pos=enc_pos, enc_valid=enc_valid)
        out.update(pixels)
        # Every decoder slot we emit has a prediction (the last target token is never a query).
        out.update(dec_ids=dec_ids, dec_targets=dec_tgt, dec_mod=dec_mod, dec_pos=dec_pos,
                   dec_valid=dec_valid, dec_loss=dec_valid.copy())
        return out

    def output_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Static (shape, dtype) of every output key (for dummy batches and shape checks)."""
        spec = {k: ((self.input_budget,), np.dtype(bool if k == "enc_valid" else np.int32)) for k in ENC_KEYS}
        for m in self.modalities:
            if m.kind == "pixels":
                hw = (m.grid[0] * m.patch_size, m.grid[1] * m.patch_size, m.channels)
                spec[PIXELS_PREFIX + m.name] = (hw, np.dtype(np.float32))
        for k in DEC_KEYS:
            spec[k] = ((self.target_budget,), np.dtype(bool if k in ("dec_valid", "dec_loss") else np.int32))
        return spec


class GrainMasking(grain.transforms.RandomMap):
    """grain wrapper: grain seeds `rng` per record (from the pipeline seed and the record index),
    so `ds.random_map(GrainMasking(t))` is deterministic and resumable."""

    def __init__(self, transform: MaskingTransform):
        self.transform = transform

    def random_map(self, element, rng: np.random.Generator):
        return self.transform(element, rng)


def collate(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack masked samples into a batch (for use outside grain's batching)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0])
    for j, s in enumerate(samples):
        if set(s) != set(keys):
            raise ValueError(f"sample {j} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    return {k: np.stack([s[k] for s in samples]) for k in keys}


def default_config() -> ml_collections.ConfigDict:
    """The `masking` sub-config the trainer config embeds (`MaskingTransform.from_config`)."""
    c = ml_collections.ConfigDict()
    # 4M uses 128/128 on 14x14 grids (4M-7); our scene modalities are 8x8 grids at 64 px.
    c.input_budget = 64
    c.target_budget = 64
    c.mixture = "all2all,rgb2all"  # presets (all2all, <X>2all), one mixture component each
    c.alpha = 0.5  # Dirichlet alpha of the presets (4M: 0.5)
    c.weights = ()  # one per component; empty = uniform
    c.keep = "random"  # sequence keep scheme of the presets: random | all | binary
    # Optional 4M per-modality layout {mod: {input_alphas: [...], target_alphas: [...], keep: [...]}};
    # when set it replaces `mixture`.
    c.alphas = None
    c.input_only = ()
    c.target_only = ()
    c.chunk_start_range = ()  # (lo, hi): ids that start a metadata chunk (the `v1=*` field tokens)
    c.redistribute = True
    c.strict_budgets = True
    c.strict_keys = True
    return c

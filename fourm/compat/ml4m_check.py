"""Parity check against a 4M fixture folder (config.json, model.safetensors, batch.npz, expected.npz).

    report = run_check(fixture_dir)      # list of Row; fourm-ml4m check prints it as a table

Everything is derived from the fixture: modalities, sizes and budgets from config.json and the
arrays, so other sizes, variants, modalities, batch sizes and budgets work unchanged.

Sections are pluggable: `register_section(name, fn)` adds `fn(ctx) -> list[Row]`, run after the
built-in "forward" section with the same loaded model (`ctx.model`). The generation replay
(generation.npz) plugs in from `fourm.compat.ml4m_generation` when that module exists.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fourm.batch import PIXELS_PREFIX
from fourm.compat import ml4m
from fourm.compat.ml4m_text import ML4MTextTokenizer
from fourm.model.loss import reduce_loss
from fourm.model.spec import ModelSpec

FLOAT_TOL = 1e-4


class FixtureError(ValueError):
    """A fixture / ml-4m batch that cannot be converted (names the array and the problem)."""


@dataclasses.dataclass
class Row:
    section: str
    name: str
    kind: str  # float | int | bool | argmax | skip
    shape: tuple
    value: str  # max abs diff, or mismatch count
    ok: bool | None  # None = not checked (skipped)
    note: str = ""


@dataclasses.dataclass
class CheckContext:
    fixture: Path
    model: Any
    spec: ModelSpec
    tol: float = FLOAT_TOL
    compiler_options: dict | None = None  # XLA options for the jitted comparisons (tests: fast compile)
    extras: dict = dataclasses.field(default_factory=dict)


_SECTIONS: list[tuple[str, Callable[[CheckContext], list[Row]]]] = []


def register_section(name: str, fn: Callable[[CheckContext], list[Row]]) -> None:
    """Add a check section (replaces one of the same name)."""
    global _SECTIONS
    _SECTIONS = [(n, f) for n, f in _SECTIONS if n != name] + [(name, fn)]


# ---------------------------------------------------------------------------------------------
# 4M masked batch -> fourm batch
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Layout:
    """Where each fourm slot came from in 4M's per-modality tensors (-1 = padding)."""

    enc_src: np.ndarray  # (B, N_enc) index into the modality's token axis
    dec_src: np.ndarray  # (B, N_dec) query index (sequences: the position that predicts i+1)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FixtureError(f"{path}: no such file")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def ml4m_batch_to_fourm(arrays: Mapping[str, np.ndarray], spec: ModelSpec,
                        num_encoder_tokens: int | None = None, num_decoder_tokens: int | None = None,
                        source: str = "batch") -> tuple[dict[str, np.ndarray], Layout]:
    """4M's `mod_dict` arrays ('<mod>/tensor', '<mod>/input_mask', '<mod>/target_mask', ...,
    True = masked out) -> fourm.batch arrays (True = present) and the slot layout."""
    present = [m for m in spec.modalities if f"{m.name}/tensor" in arrays]
    if not present:
        raise FixtureError(f"{source}: no '<modality>/tensor' array for any of {list(spec.names)}")
    unknown = sorted({k.split("/")[0] for k in arrays if k.endswith("/tensor")} - set(spec.names) - {"raw"})
    if unknown:
        raise FixtureError(f"{source}: modalities {unknown} are not in the model ({list(spec.names)})")
    bsz = int(arrays[f"{present[0].name}/tensor"].shape[0])
    n_enc = int(num_encoder_tokens if num_encoder_tokens is not None else arrays["num_encoder_tokens"])
    n_dec = int(num_decoder_tokens if num_decoder_tokens is not None else arrays["num_decoder_tokens"])
    z = lambda n: np.zeros((bsz, n), np.int32)  # noqa: E731
    out = dict(enc_ids=z(n_enc), enc_mod=z(n_enc), enc_pos=z(n_enc), enc_valid=np.zeros((bsz, n_enc), bool),
               dec_ids=z(n_dec), dec_targets=z(n_dec), dec_mod=z(n_dec), dec_pos=z(n_dec),
               dec_valid=np.zeros((bsz, n_dec), bool))
    layout = Layout(np.full((bsz, n_enc), -1, np.int64), np.full((bsz, n_dec), -1, np.int64))

    def field(m, f):
        key = f"{m.name}/{f}"
        if key not in arrays:
            raise FixtureError(f"{source}: missing array {key!r}")
        a = np.asarray(arrays[key])
        if a.shape[0] != bsz:
            raise FixtureError(f"{source}: {key!r} has batch size {a.shape[0]}, expected {bsz}")
        return a

    for m in present:
        if m.kind == "pixels":
            img = field(m, "tensor")
            want = (bsz, m.channels, m.grid[0] * m.patch_size, m.grid[1] * m.patch_size)
            if img.shape != want:
                raise FixtureError(f"{source}: {m.name}/tensor has shape {img.shape}, expected {want} (B, C, H, W)")
            out[PIXELS_PREFIX + m.name] = np.ascontiguousarray(img.transpose(0, 2, 3, 1)).astype(np.float32)

    for b in range(bsz):
        e = d = 0
        for i, m in enumerate(spec.modalities):
            if m not in present:
                continue
            tensor = field(m, "tensor")[b].reshape(-1) if m.kind != "pixels" else None
            if i in spec.inputs:
                keep = np.flatnonzero(~field(m, "input_mask")[b].astype(bool))
                pos = np.arange(len(keep)) if m.kind == "sequence" else keep
                if e + len(keep) > n_enc:
                    raise FixtureError(f"{source}: sample {b} has more encoder inputs than num_encoder_tokens"
                                       f"={n_enc} (reached at {m.name!r})")
                _check_range(m, pos, tensor, keep, spec, source, b, "input")
                sl = slice(e, e + len(keep))
                out["enc_ids"][b, sl] = 0 if tensor is None else tensor[keep]
                out["enc_mod"][b, sl], out["enc_pos"][b, sl], out["enc_valid"][b, sl] = i, pos, True
                layout.enc_src[b, sl] = keep
                e += len(keep)
            if i in spec.targets:
                tm = field(m, "target_mask")[b].astype(bool)
                _check_decoder_attention(m, arrays, b, tm, source)
                if m.kind == "sequence":
                    q = np.flatnonzero(~tm[:-1] & ~tm[1:])
                    pos = (np.cumsum(~tm) - 1)[q]
                    pos = np.where(pos >= m.max_length, 0, pos)  # 4M's decoder embedding does this
                    ids, tgt = tensor[q], tensor[q + 1]
                else:
                    q = np.flatnonzero(~tm)
                    pos, ids, tgt = q, np.zeros_like(q), tensor[q]
                if d + len(q) > n_dec:
                    raise FixtureError(f"{source}: sample {b} has more decoder targets than num_decoder_tokens"
                                       f"={n_dec} (reached at {m.name!r})")
                _check_range(m, pos, tgt, np.arange(len(q)), spec, source, b, "target")
                sl = slice(d, d + len(q))
                out["dec_ids"][b, sl], out["dec_targets"][b, sl] = ids, tgt
                out["dec_mod"][b, sl], out["dec_pos"][b, sl], out["dec_valid"][b, sl] = i, pos, True
                layout.dec_src[b, sl] = q
                d += len(q)
    out["dec_loss"] = out["dec_valid"].copy()
    return out, layout


def _check_range(m, pos, tensor, idx, spec, source, b, what) -> None:
    if m.kind == "sequence" and len(pos) and pos.max() >= max(m.max_length, spec.seq_pos_len):
        raise FixtureError(f"{source}: sample {b} {m.name!r} {what} position {pos.max()} is beyond its "
                           f"position table ({max(m.max_length, spec.seq_pos_len)} rows)")
    if tensor is not None and len(idx):
        vals = tensor[idx]
        if vals.min() < 0 or vals.max() >= m.vocab_size:
            raise FixtureError(f"{source}: sample {b} {m.name!r} {what} token ids span [{vals.min()}, "
                               f"{vals.max()}], outside the vocabulary [0, {m.vocab_size})")


def _check_decoder_attention(m, arrays, b, tm, source) -> None:
    """fourm's decoder mask assumes 4M's standard compressed decoder_attention_mask."""
    key = f"{m.name}/decoder_attention_mask"
    if key not in arrays:
        return
    dam = np.asarray(arrays[key][b]).reshape(-1)
    tgt = np.flatnonzero(~tm)
    want = np.zeros_like(dam)
    if m.kind == "sequence":
        want[tgt] = 1
    elif len(tgt):
        want[tgt[0]] = len(tgt)
    if not np.array_equal(dam, want):
        raise FixtureError(f"{source}: {key} of sample {b} is not 4M's standard layout (grid: target count "
                           "at the first target; sequence: 1 at every target); fourm cannot express it")


# ---------------------------------------------------------------------------------------------
# forward section
# ---------------------------------------------------------------------------------------------


def _forward(model, batch, compiler_options=None):
    """Everything the forward comparison needs, in one jitted call."""
    spec = model.spec

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run(batch):
        enc = model.encode(batch)
        y = model.decode(enc, batch)
        nll, correct, head_ids = model.target_nll(y, batch)
        loss, metrics = reduce_loss(spec, nll, correct, head_ids, "mod")
        logits = {spec.modalities[i].name: model.logits(y, spec.modalities[i].name) for i in spec.targets}
        return enc.features, y, nll, loss, metrics, logits

    return jax.device_get(run({k: jnp.asarray(v) for k, v in batch.items()}))


def _scatter(values, src, length, fill, dtype):
    bsz = src.shape[0]
    out = np.full((bsz, length) + values.shape[2:], fill, dtype)
    bi, si = np.nonzero(src >= 0)
    out[bi, src[bi, si]] = values[bi, si]
    return out


def compute_fourm_outputs(model, arrays, expected: Mapping[str, np.ndarray],
                          compiler_options: dict | None = None) -> dict[str, np.ndarray]:
    """fourm's versions of expected.npz's arrays (same keys, shapes, conventions).

    `expected` supplies the output lengths per modality and the `logits_sample_pos` rows."""
    expected_shapes = {k: np.shape(v) for k, v in expected.items()}
    spec = model.spec
    batch, layout = ml4m_batch_to_fourm(arrays, spec)
    feats, y, nll, loss, metrics, logits = _forward(model, batch, compiler_options)
    res: dict[str, np.ndarray] = {"loss": np.float32(loss)}
    res["num_valid_encoder_tokens"] = batch["enc_valid"].sum(1).astype(np.int64)
    res["num_valid_decoder_tokens"] = batch["dec_valid"].sum(1).astype(np.int64)
    for i in spec.inputs:
        m = spec.modalities[i]
        if f"encoder_out/{m.name}" not in expected_shapes:
            continue
        length = expected_shapes[f"encoder_out/{m.name}"][1]
        src = np.where(batch["enc_mod"] == i, layout.enc_src, -1)
        res[f"encoder_out/{m.name}"] = _scatter(feats, src, length, 0.0, np.float32)
        res[f"encoder_valid/{m.name}"] = _scatter(np.ones_like(src, bool), src, length, False, bool)
    for i in spec.targets:
        name = spec.modalities[i].name
        res[f"loss/{name}"] = np.float32(metrics[f"loss/{name}"])
        if f"target_valid/{name}" not in expected_shapes:
            continue
        length = expected_shapes[f"target_valid/{name}"][1]
        src = np.where(batch["dec_mod"] == i, layout.dec_src, -1)
        lg = logits[name]
        top2 = np.sort(lg, axis=-1)[..., -2:]
        res[f"target_valid/{name}"] = _scatter(np.ones_like(src, bool), src, length, False, bool)
        res[f"target_ids/{name}"] = _scatter(batch["dec_targets"].astype(np.int64), src, length, -1, np.int64)
        res[f"target_logprob/{name}"] = _scatter(-nll, src, length, 0.0, np.float32)
        res[f"argmax/{name}"] = _scatter(lg.argmax(-1).astype(np.int64), src, length, -1, np.int64)
        res[f"argmax_margin/{name}"] = _scatter(top2[..., 1] - top2[..., 0], src, length, 0.0, np.float32)
        res[f"decoder_out/{name}"] = _scatter(y, src, length, 0.0, np.float32)
        pos_key = f"logits_sample_pos/{name}"
        if pos_key in expected:
            full = _scatter(lg, src, length, np.nan, np.float32)
            pos = np.asarray(expected[pos_key])
            res[f"logits_sample/{name}"] = full[pos[:, 0], pos[:, 1]]
    return res


def compare(name: str, ours: np.ndarray | None, ref: np.ndarray, tol: float, section: str = "forward",
            margin: np.ndarray | None = None, margin_tol: float = 0.0) -> Row:
    ref = np.asarray(ref)
    if ours is None:
        return Row(section, name, "?", ref.shape, "not produced", False, "fourm has no counterpart")
    ours = np.asarray(ours)
    if ours.shape != ref.shape:
        return Row(section, name, "?", ref.shape, f"shape {ours.shape}", False, "shape mismatch")
    if np.issubdtype(ref.dtype, np.floating):
        diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        ok = bool(np.isfinite(diff) and diff <= tol)
        return Row(section, name, "float", ref.shape, f"{diff:.3g}", ok)
    bad = ours != ref
    if margin is not None:
        hard = bad & (margin > margin_tol)
        note = f"{int(bad.sum())} differ, all at margins <= {margin_tol:.2g}" if bad.any() and not hard.any() else ""
        return Row(section, name, "argmax", ref.shape, f"{int(hard.sum())} mismatches", not hard.any(), note)
    kind = "bool" if ref.dtype == bool else "int"
    return Row(section, name, kind, ref.shape, f"{int(bad.sum())} mismatches", not bad.any())


def forward_section(ctx: CheckContext) -> list[Row]:
    arrays = _load_npz(ctx.fixture / "batch.npz")
    expected = _load_npz(ctx.fixture / "expected.npz")
    ours = compute_fourm_outputs(ctx.model, arrays, expected, ctx.compiler_options)
    ctx.extras["forward"] = ours
    # Our logit error, measured where full logits are known: argmax may differ below it.
    logit_err = max([float(np.max(np.abs(ours[k] - expected[k]))) for k in expected
                     if k.startswith("logits_sample/") and k in ours] or [ctx.tol])
    rows = []
    for k in expected:
        if k == "decoder_modality_order":
            rows.append(Row("forward", k, "skip", expected[k].shape, "-", None,
                            "4M's random block order; attention makes outputs order-free"))
            continue
        if k.startswith("logits_sample_pos/"):
            rows.append(Row("forward", k, "skip", expected[k].shape, "-", None, "input: rows of logits_sample"))
            continue
        margin = expected.get(f"argmax_margin/{k.split('/', 1)[1]}") if k.startswith("argmax/") else None
        rows.append(compare(k, ours.get(k), expected[k], ctx.tol, margin=margin,
                            margin_tol=2 * max(logit_err, 1e-6)))
    return rows


register_section("forward", forward_section)


def _generation_placeholder(ctx: CheckContext) -> list[Row]:
    if not (ctx.fixture / "generation.npz").exists():
        return []
    return [Row("generation", "generation.npz", "skip", (), "-", None,
                "not checked: fourm.compat.ml4m_generation is not installed")]


def run_check(fixture: str | Path, tol: float = FLOAT_TOL, model=None, compiler_options: dict | None = None,
              sections: list[str] | None = None, text_tokenizer=None, **runtime) -> list[Row]:
    """Load the fixture's checkpoint through the converter (unless `model` is given: one already
    loaded with `fourm.compat.ml4m.load(fixture)`) and run the registered sections (all, or the
    names in `sections`). `text_tokenizer`: 4M's WordPiece JSON (path or loaded), to compare
    decoded text too."""
    fixture = Path(fixture)
    if not fixture.is_dir():
        raise FixtureError(f"{fixture}: no such fixture folder")
    try:  # the generation replay plugs itself in via register_section when available
        importlib.import_module("fourm.compat.ml4m_generation")
    except ModuleNotFoundError as e:
        if e.name != "fourm.compat.ml4m_generation":
            raise
        register_section("generation", _generation_placeholder)
    if text_tokenizer is not None and not isinstance(text_tokenizer, ML4MTextTokenizer):
        try:  # before any work: a wrong path is a bad input, not a late failure
            text_tokenizer = ML4MTextTokenizer.load(text_tokenizer)
        except (ValueError, OSError) as e:
            raise FixtureError(f"text tokenizer: {e}") from None
    model = model if model is not None else ml4m.load(fixture, **runtime)
    ctx = CheckContext(fixture, model, model.spec, tol, compiler_options)
    if text_tokenizer is not None:
        ctx.extras["text_tokenizer"] = text_tokenizer
    rows: list[Row] = []
    known = [n for n, _ in _SECTIONS]
    unknown = sorted(set(sections or ()) - set(known))
    if unknown:
        raise FixtureError(f"unknown check sections {unknown}; known: {known}")
    for name, fn in _SECTIONS:
        if sections is None or name in sections:
            rows.extend(fn(ctx))
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("section", "array", "kind", "shape", "max|diff| / mismatches", "status", "note")
    body = [(r.section, r.name, r.kind, "x".join(map(str, r.shape)) or "()", r.value,
             "SKIP" if r.ok is None else ("ok" if r.ok else "FAIL"), r.note) for r in rows]
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def passed(rows: list[Row]) -> bool:
    return all(r.ok is not False for r in rows)

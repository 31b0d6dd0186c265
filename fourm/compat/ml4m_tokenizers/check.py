"""Parity of fourm's 4M tokenizers with a reference fixture folder.

    rows = run_check("../shared/fixtures/ml4m/tokenizers/vqvae_vit_semseg")   # fourm-ml4m check-tokenizer

A fixture folder holds the tokenizer (config.json + model.safetensors), `fixture.json` (the class,
and for DiVAE the decode settings) and `fixture.npz` with the reference's `inputs`, `tokens`
(= tokenize(inputs)), `quant` (= encode(inputs)[0]) and `decoded` (= decode_tokens(tokens)), plus
`noise` / `timesteps` for DiVAE. Rows: tokens (mismatch count, must be 0), quant, the codebook
lookup of the reference tokens (`quant_from_tokens`, 4M checks it equals quant) and decoded
(max |diff| within `tol`). Everything is computed at highest matmul precision, so GPUs/TPUs do
not trade parity for TF32/bf16 passes. The tiny architecture names of the public fixtures
(`FIXTURE_VITS`) are registered first. Text tokenizer fixtures (class `text_tokenizer`) go to
4M's WordPiece check (`fourm.compat.ml4m_text_check`). A DiVAE whose decoded images cannot be compared makes the
check fail (row `decoded`, with the reason), never pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from fourm.compat.ml4m_check import FLOAT_TOL, FixtureError, Row, compare
from fourm.compat.ml4m_text_check import check_text_fixture
from fourm.compat.ml4m_tokenizers import load as tload
from fourm.compat.ml4m_tokenizers.config import register_fixture_archs

SECTION = "tokenizer"
REQUIRED_ARRAYS = ("inputs", "tokens", "quant", "decoded")


def _text_meta(fixture: Path) -> dict:
    try:
        return json.loads((fixture / "fixture.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # read_fixture reports it


def read_fixture(fixture: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not fixture.is_dir():
        raise FixtureError(f"{fixture}: no such fixture folder")
    meta_path, npz_path = fixture / "fixture.json", fixture / "fixture.npz"
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise FixtureError(f"{meta_path}: not valid JSON ({e})") from e
    if not npz_path.is_file():
        raise FixtureError(f"{npz_path}: no such file (a tokenizer fixture has fixture.npz with "
                           f"{list(REQUIRED_ARRAYS)})")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise FixtureError(f"{npz_path}: cannot read ({e})") from e
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise FixtureError(f"{npz_path}: missing array(s) {missing}; has {sorted(arrays)}")
    return meta, arrays


def _decoded_rows(tok, meta, arrays, tol) -> list[Row]:
    ref = arrays["decoded"]
    if tok.cfg.cls == "VQVAE":
        return [compare("decoded", tok.decode_tokens(arrays["tokens"]), ref, tol, SECTION)]
    missing = [k for k in ("noise", "timesteps") if k not in arrays]
    if missing:
        raise FixtureError(f"DiVAE fixture.npz lacks {missing} (the recorded initial noise and timesteps)")
    rows, settings = [], meta.get("decode", {})
    steps = settings.get("num_inference_steps")
    if steps is not None:  # our scheduler spaces the steps as the reference did
        ours_ts = tload.diffusion.scheduler_timesteps(tok.raw_config, int(steps),
                                                      settings.get("scheduler_timesteps_mode", "trailing"))
        rows.append(compare("timesteps", np.asarray(ours_ts), arrays["timesteps"], tol, SECTION))
    quant = tok.tokens_to_embedding(arrays["tokens"])
    kw = {"num_inference_steps": int(steps)} if steps is not None else {}
    ours = tload.diffusion_decode(tok, quant, noise=arrays["noise"], timesteps=arrays["timesteps"], **kw)
    return rows + [compare("decoded", ours, ref, tol, SECTION)]


def run_check(fixture, tol: float = FLOAT_TOL) -> list[Row]:
    fixture = Path(fixture)
    meta = _text_meta(fixture)
    if meta.get("class") == "text_tokenizer":  # 4M's WordPiece text tokenizer: its own check
        return check_text_fixture(fixture)
    meta, arrays = read_fixture(fixture)
    register_fixture_archs()
    tload.unet.register_fixture_unets()
    tok = tload.load(fixture, cls=meta.get("class"))
    rows = []
    with jax.default_matmul_precision("highest"):
        try:
            quant, tokens = tok.encode(arrays["inputs"])
            from_tokens = tok.tokens_to_embedding(arrays["tokens"])
        except ValueError as e:
            raise FixtureError(f"{fixture / 'fixture.npz'}: {e}") from e
        rows.append(compare("tokens", tokens, arrays["tokens"], tol, SECTION))
        rows.append(compare("quant", quant, arrays["quant"], tol, SECTION))
        rows.append(compare("quant_from_tokens", from_tokens, arrays["quant"], tol, SECTION))
        rows += _decoded_rows(tok, meta, arrays, tol)
    return rows

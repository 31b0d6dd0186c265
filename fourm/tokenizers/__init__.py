"""Tokenizers: VQ/FSQ image-like tokenizers (`image`, `vqvae`, `quantizers`, `codecs`, `losses`,
`train`, `evaluate`, `export`), text (`text`), structure-as-text (`structure`), pre-tokenization
(`pretokenize`).

`load(path)` returns an image-like tokenizer from an exported artifact directory (see `export`)
or from a training run's latest checkpoint.
"""


def load(path, modality: str | None = None, what: str = "tokenizer"):
    """An `ImageTokenizer` from an export directory or a tokenizer training workdir; with
    `modality`, an error unless it is that modality's tokenizer (another one with the same
    vocabulary size would otherwise make plausible-looking tokens of the wrong kind)."""
    from pathlib import Path

    from fourm.tokenizers.export import load as _load

    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {path}: no such folder (expected a tokenizer export or a "
                                "fourm-train-tokenizer workdir)")
    tok = _load(path)
    if modality is not None and tok.name != modality:
        raise ValueError(f"{what} {path} is the tokenizer of {tok.name!r}, not of {modality!r}")
    return tok

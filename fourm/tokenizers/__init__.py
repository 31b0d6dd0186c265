"""Tokenizers: VQ/FSQ image-like tokenizers (`image`, `vqvae`, `quantizers`, `codecs`, `losses`,
`train`, `evaluate`, `export`), text (`text`), structure-as-text (`structure`), pre-tokenization
(`pretokenize`).

`load(path)` returns an image-like tokenizer from an exported artifact directory (see `export`)
or from a training run's latest checkpoint.
"""


def load(path):
    """An `ImageTokenizer` from an export directory or a tokenizer training workdir."""
    from fourm.tokenizers.export import load as _load

    return _load(path)

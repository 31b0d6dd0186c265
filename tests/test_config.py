"""`--config` overrides: one path (ml-collections' config flag) for the commands and for
`load_config`; every sequence field takes overrides, keys may be modality names with `@`."""

import pytest

from fourm.config import load_config


@pytest.mark.parametrize("config,field,values", [
    ("pretokenize", "modalities", ("rgb@64", "caption")),  # a list in the config file
    ("bench", "only", ("model", "scenes")),
    ("pretrain:smoke", "model.domains_in", ("rgb@64",)),
])
def test_sequence_fields_take_overrides(config, field, values):
    def value(cfg):
        for key in field.split("."):
            cfg = cfg[key]
        return cfg

    per_element = [f"{field}={v}" for v in values]  # ml-collections: one flag per element
    assert value(load_config(config, per_element)) == tuple(values)
    assert value(load_config(config, [f"{field}={values!r}"])) == tuple(values)  # a literal


def test_modality_keys_with_at_sign():
    c = load_config("pretokenize", ["image_tokenizers.tok_depth@64=exports/d",
                                    "image_tokenizers.tok_depth@224=exports/d224"])
    assert c.image_tokenizers["tok_depth@64"] == "exports/d"
    assert c.image_tokenizers["tok_depth@224"] == "exports/d224"  # a registered name: added
    c = load_config("pretrain:smoke", ["model.vocab_overrides.caption=5000"])
    assert c.model.vocab_overrides["caption"] == 5000
    with pytest.raises(ValueError, match="unknown config key 'image_tokenizers.nosuch'"):
        load_config("pretokenize", ["image_tokenizers.nosuch=x"])


def test_library_never_imports_the_cli():
    """cli/ parses flags and calls the library; the library imports no command module (those
    define flags and process set-up)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "fourm"
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "cli" and path.parent.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "fourm":
                names = [f"fourm.{a.name}" for a in node.names]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names
                          if n == "fourm.cli" or n.startswith("fourm.cli.")]
    assert not offenders, offenders

"""Parity of 4M's WordPiece text tokenizer with a `text_tokenizer` fixture folder.

    rows = check_text_fixture("../shared/fixtures/ml4m/tokenizers/wordpiece_text")

The folder holds the tokenizer JSON and `fixture.json` (class `text_tokenizer`): strings with the
ids, tokens and both decodes ml-4m produced, raw id sequences with their decodes, and the ids of
the reserved tokens. Every one of them is compared exactly; one `Row` per compared item (the
table `fourm-ml4m check-tokenizer` prints).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from fourm.compat.ml4m_check import FixtureError, Row
from fourm.compat.ml4m_text import ML4MTextTokenizer, find_tokenizer_file
from fourm.io import read_json_object

SECTION = "text"
FIXTURE_CLASS = "text_tokenizer"


def _read_fixture(folder: Path) -> dict:
    path = folder / "fixture.json"
    doc = read_json_object(path, FixtureError, "no such file (a text tokenizer fixture has fixture.json)")
    if doc.get("class") != FIXTURE_CLASS:
        raise FixtureError(f"{path}: class {doc.get('class')!r}, expected {FIXTURE_CLASS!r}")
    for key in ("cases",):
        if not isinstance(doc.get(key), list):
            raise FixtureError(f"{path}: field {key!r} missing or not a list")
    return doc


def _tokenizer_path(folder: Path, doc: dict) -> Path:
    name = doc.get("tokenizer_file")
    if name is None:
        found = find_tokenizer_file(folder)
        if found is None:
            raise FixtureError(f"{folder}: fixture.json names no tokenizer_file and there is no "
                               "text_tokenizer*.json")
        return found
    path = (folder / str(name)).resolve()
    if folder.resolve() not in path.parents:  # a data file may not point outside its folder
        raise FixtureError(f"{folder / 'fixture.json'}: tokenizer_file {name!r} is outside the folder")
    if not path.is_file():
        raise FixtureError(f"{folder / 'fixture.json'}: tokenizer_file {name!r} does not exist")
    return path


def _short(x: Any, n: int = 60) -> str:
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _same(name: str, ours: Any, ref: Any) -> Row:
    """Exact comparison of a list (ids / tokens) or a scalar (string / int)."""
    if isinstance(ref, list):
        ours = list(ours)
        bad = sum(a != b for a, b in zip(ours, ref)) + abs(len(ours) - len(ref))
        note = "" if not bad else f"got {_short(ours)}, 4M {_short(ref)}"
        kind = "int" if all(isinstance(x, int) for x in ref) else "str"
        return Row(SECTION, name, kind, (len(ref),), f"{bad} mismatches", bad == 0, note)
    ok = ours == ref
    return Row(SECTION, name, "int" if isinstance(ref, int) else "str", (),
               "equal" if ok else "differs", ok, "" if ok else f"got {_short(ours)}, 4M {_short(ref)}")


def check_text_fixture(folder: str | Path) -> list[Row]:
    """Rows comparing fourm's reading of the fixture's tokenizer JSON with ml-4m's recorded outputs."""
    folder = Path(folder)
    doc = _read_fixture(folder)
    path = _tokenizer_path(folder, doc)
    try:
        tok = ML4MTextTokenizer.load(path)
    except (ValueError, FileNotFoundError) as e:
        raise FixtureError(str(e)) from None
    rows: list[Row] = []
    if "tokenizer_sha256" in doc:
        rows.append(_same("tokenizer_sha256", hashlib.sha256(path.read_bytes()).hexdigest(),
                          doc["tokenizer_sha256"]))
    if "vocab_size_with_added" in doc:
        rows.append(_same("vocab_size", tok.vocab_size, int(doc["vocab_size_with_added"])))
    if "num_sentinels" in doc:
        rows.append(_same("num_sentinels", tok.num_sentinels, int(doc["num_sentinels"])))
    # The reserved ids the models rely on: through the layout (what generation uses), not the file.
    for piece, want in dict(doc.get("special_token_ids", {})).items():
        rows.append(_same(f"id of {piece}", _layout_id(tok, piece), int(want)))
    for i, want in dict(doc.get("sentinel_to_id_first5", {})).items():
        rows.append(_same(f"sentinel_id({i})", tok.sentinel_id(int(i)), int(want)))
    for k, case in enumerate(doc["cases"]):
        label = f"case {k:02d} {str(case.get('kind', '')).split(' ')[0]}"
        try:
            ids = tok.encode(case["text"], allow_empty=True)
        except KeyError as e:
            raise FixtureError(f"{folder / 'fixture.json'}: case {k} lacks field {e.args[0]!r}") from None
        rows.append(_same(f"{label}/ids", ids, case["ids"]))
        if "tokens" in case:
            rows.append(_same(f"{label}/tokens", tok.tokens(case["text"]), case["tokens"]))
        rows += _decodes(tok, label, case["ids"], case)
    for k, case in enumerate(doc.get("decode_cases", [])):
        label = f"decode {k:02d}"
        rows += _decodes(tok, label, case["ids"], case)
        if "id_to_token" in case:
            rows.append(_same(f"{label}/id_to_token", [tok.id_to_piece(i) for i in case["ids"]],
                              case["id_to_token"]))
    return rows


def _decodes(tok: ML4MTextTokenizer, label: str, ids: list[int], case: dict) -> list[Row]:
    rows = []
    for key, skip in (("decode_skip_special_false", False), ("decode_skip_special_true", True)):
        if key in case:
            rows.append(_same(f"{label}/{key.replace('decode_', 'decode/')}",
                              tok.decode(ids, skip_special_tokens=skip), case[key]))
    return rows


def _layout_id(tok: ML4MTextTokenizer, piece: str) -> int | None:
    """The id fourm assigns `piece` without looking it up: specials, sentinels and values come from
    the layout; other added tokens (class names) from the file."""
    if m := re.fullmatch(r"\[S_(\d+)\]", piece):
        return tok.sentinel_id(int(m.group(1)))
    if m := re.fullmatch(r"v([0-3])=(\d+)", piece):
        return tok.value_id(int(m.group(1)), int(m.group(2)))
    return {"[PAD]": tok.pad_id, "[UNK]": tok.unk_id, "[SOS]": tok.sos_id,
            "[EOS]": tok.eos_id}.get(piece, tok.token_to_id(piece))

"""4M's WordPiece text tokenizer (fourm.compat.ml4m_text): parity with ml-4m's recorded outputs,
4M's reserved ids, 4M-21's box / palette / metadata strings, and bad input."""

import json
import shutil

import numpy as np
import pytest

from fourm.compat import ml4m_text as mt
from fourm.compat.ml4m_check import FixtureError, passed
from fourm.compat.ml4m_text_check import check_text_fixture
from fourm.generate.inputs import TextIds


@pytest.fixture(scope="module")
def wp_dir(shared_dir):
    d = shared_dir / "fixtures" / "ml4m" / "tokenizers" / "wordpiece_text"
    if not (d / "fixture.json").is_file():
        pytest.skip(f"wordpiece fixture not found at {d}")
    return d


@pytest.fixture(scope="module")
def fx(wp_dir):
    return json.loads((wp_dir / "fixture.json").read_text())


@pytest.fixture(scope="module")
def tok(wp_dir):
    return mt.ML4MTextTokenizer.load(wp_dir)


def _case(fx, kind_prefix):
    return next(c for c in fx["cases"] if c["kind"].startswith(kind_prefix))


def test_every_fixture_case_matches_ml4m(tok, fx):
    assert len(fx["cases"]) == 20
    for c in fx["cases"]:
        ids = tok.encode(c["text"], allow_empty=True)
        assert ids == c["ids"], c["kind"]
        assert tok.tokens(c["text"]) == c["tokens"], c["kind"]
        assert tok.decode(ids) == c["decode_skip_special_false"], c["kind"]
        assert tok.decode(ids, skip_special_tokens=True) == c["decode_skip_special_true"], c["kind"]
    for c in fx["decode_cases"]:
        assert tok.decode(c["ids"]) == c["decode_skip_special_false"]
        assert tok.decode(c["ids"], skip_special_tokens=True) == c["decode_skip_special_true"]
        assert [tok.id_to_piece(i) for i in c["ids"]] == c["id_to_token"]


def test_check_function_passes_and_fails(wp_dir, tmp_path):
    rows = check_text_fixture(wp_dir)
    assert passed(rows)
    names = {r.name for r in rows}
    for k in range(20):  # ids, tokens and both decodes of every case are compared
        for what in ("ids", "tokens", "decode/skip_special_false", "decode/skip_special_true"):
            assert any(n.startswith(f"case {k:02d} ") and n.endswith(what) for n in names), (k, what)
    # the same strings through a tokenizer that does not lower-case: the check must say FAIL
    d = tmp_path / "wp"
    shutil.copytree(wp_dir, d)
    name = json.loads((d / "fixture.json").read_text())["tokenizer_file"]
    doc = json.loads((d / name).read_text())
    doc["normalizer"]["lowercase"] = False
    (d / name).write_text(json.dumps(doc))
    rows = check_text_fixture(d)
    failed = {r.name for r in rows if r.ok is False}
    assert "tokenizer_sha256" in failed and any(n.endswith("/ids") for n in failed)
    assert not passed(rows)


def test_layout_is_4ms_and_feeds_generation(tok, fx):
    assert tok.layout == mt.ML4M_TEXT_LAYOUT
    assert (tok.vocab_size, tok.num_sentinels, tok.value_bins) == (30000, 200, 1000)
    for piece, want in fx["special_token_ids"].items():
        assert tok.token_to_id(piece) == want, piece
    assert [tok.sentinel_id(int(i)) for i in fx["sentinel_to_id_first5"]] == list(fx["sentinel_to_id_first5"].values())
    assert tok.sentinel_id(199) == 203 and tok.value_id(0, 0) == 204 and tok.value_id(3, 999) == 4203
    assert (tok.pad_id, tok.unk_id, tok.sos_id, tok.eos_id) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="sentinel index 200"):
        tok.sentinel_id(200)
    ids = TextIds.of(tok)  # what fourm.generate reads from a text tokenizer
    assert (ids.pad, ids.eos, ids.sentinel(1), ids.num_sentinels) == (0, 3, 5, 200)
    assert "traffic light" in tok.class_names() and len(tok.class_names()) == 80


def test_det_palette_metadata_strings_match_4m(tok, fx):
    boxes = [(0.012, 0.034, 0.056, 0.078, "person", 0.9), (0.25, 0.5, 0.75, 0.999, "dog", 0.8),
             (0.1, 0.2, 0.3, 0.4, "traffic light", 0.7), (0.0, 0.0, 1.0, 1.0, "dining table", 0.95)]
    det = _case(fx, "det_4M21")
    assert mt.boxes_to_text(boxes) == det["text"]
    back = mt.text_to_boxes(tok.decode(det["ids"]))
    assert [b[4] for b in back] == ["person", "dog", "traffic light", "dining table"]
    assert all(abs(a - b) <= 0.5 / 999 + 1e-9 for x, y in zip(back, boxes) for a, b in zip(x[:4], y[:4]))
    assert mt.text_to_boxes("v0=1 v1=2 v2=3 cat v0=1 v1=2 v2=3 v3=4 dog [EOS]") == [
        (1 / 999, 2 / 999, 3 / 999, 4 / 999, "dog")]  # an incomplete group is skipped
    assert [b[4] for b in mt.order_boxes(boxes)] == ["dining table", "person", "traffic light", "dog"]
    with pytest.raises(ValueError, match="box 1: coordinate 1.5"):
        mt.boxes_to_text([(0, 0, 1, 1, "a"), (0, 0, 1.5, 1, "b")])

    palette = [12, 200, 45, 255, 0, 128, 7, 7, 7]
    assert mt.palette_to_text(palette) == _case(fx, "color_palette")["text"]
    assert mt.text_to_palette(_case(fx, "color_palette")["text"]) == [(12, 200, 45), (255, 0, 128), (7, 7, 7)]

    # values chosen so that rounding instead of 4M's truncation (int(), //) would differ
    meta = dict(original_width=660, original_height=500, caption_n_words=12, n_humans=2,
                brightness=133, contrast=61.5, watermark_score=0.2, aesthetic_score=5.0,
                walkability=0.34, geometric_complexity=0.9)
    text = _case(fx, "metadata")["text"]
    assert mt.metadata_to_text(meta) == text
    assert mt.metadata_to_text(meta, chunks=True)[:2] == ["v1=0 v0=20", "v1=1 v0=15"]
    assert mt.text_to_metadata(text) == dict(original_width=20, original_height=15, caption_n_words=12,
                                             n_humans=2, brightness=25, contrast=23, watermark_score=0,
                                             aesthetic_score=1, walkability=16, geometric_complexity=49)
    with pytest.raises(ValueError, match="unknown metadata fields \\['frobnicate'\\]"):
        mt.metadata_to_text({"frobnicate": 1})
    for s in (det["text"], text, mt.palette_to_text(palette)):  # every v-token is one token
        assert len(tok.encode(s)) == len(s.split()) - s.count("traffic light") - s.count("dining table")


def test_bad_input_is_named(tok, wp_dir, tmp_path):
    with pytest.raises(ValueError, match=r"token id 30000 at position 1 is outside"):
        tok.decode([5, 30000])
    with pytest.raises(ValueError, match="gives no tokens"):
        tok.encode("   ")
    with pytest.raises(TypeError, match="encodes str"):
        tok.encode(b"bytes")
    with pytest.raises(FileNotFoundError, match="no text_tokenizer"):
        mt.ML4MTextTokenizer.load(tmp_path)
    (tmp_path / "text_tokenizer_bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        mt.ML4MTextTokenizer.load(tmp_path)
    doc = json.loads(next(wp_dir.glob("text_tokenizer*.json")).read_text())
    vocab = doc["model"]["vocab"]  # swap two sentinels: the layout check names the token
    vocab["[S_3]"], vocab["[S_4]"] = vocab["[S_4]"], vocab["[S_3]"]
    for t in doc["added_tokens"]:
        if t["content"] in ("[S_3]", "[S_4]"):
            t["content"] = "[S_4]" if t["content"] == "[S_3]" else "[S_3]"
    (tmp_path / "text_tokenizer_bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"\[S_3\] has id 8, 4M's layout .* needs 7"):
        mt.ML4MTextTokenizer.load(tmp_path / "text_tokenizer_bad.json")
    bad = tmp_path / "fx"
    shutil.copytree(wp_dir, bad)
    doc = json.loads((bad / "fixture.json").read_text())
    doc["tokenizer_file"] = "../../etc/passwd"
    (bad / "fixture.json").write_text(json.dumps(doc))
    with pytest.raises(FixtureError, match="outside the folder"):
        check_text_fixture(bad)


def test_decodes_a_4m_generation_as_4m(tok, shared_dir):
    """The tiny 4M model's greedy caption (generation.npz) decodes to the text ml-4m printed."""
    path = shared_dir / "fixtures" / "ml4m" / "tiny_swiglu" / "generation.npz"
    if not path.is_file():
        pytest.skip("tiny_swiglu fixture not available")
    g = np.load(path, allow_pickle=False)
    seq = g["caption_ar/sequence"]
    assert tok.decode(seq) == str(g["caption_ar/decoded_text"])
    assert tok.decode(g["caption_ar/merged"]) == str(g["caption_ar/decoded_text"]).removeprefix("[S_1] ")


def test_generate_cli_finds_the_wordpiece_json(wp_dir, tmp_path):
    from fourm.cli.generate import load_tokenizers

    name = json.loads((wp_dir / "fixture.json").read_text())["tokenizer_file"]
    shutil.copy(wp_dir / name, tmp_path / name)  # beside the image tokenizer folders, as released
    assert isinstance(load_tokenizers(str(tmp_path))["text"], mt.ML4MTextTokenizer)
    (tmp_path / "text").mkdir()
    shutil.copy(wp_dir / name, tmp_path / "text" / name)
    with pytest.raises(ValueError, match="both hold a text tokenizer"):
        load_tokenizers(str(tmp_path))

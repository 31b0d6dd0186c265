"""Text tokenizer: fixed special-token layout, exact Unicode round trip, determinism, errors."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fourm import modalities
from fourm.tokenizers import text as text_lib
from fourm.tokenizers.text import TextLayout, TextTokenizer

CORPUS = [
    "A small red cube stands to the left of a large blue sphere.",
    "There are two green cylinders and one yellow cone on the grey floor.",
    "The room has cream walls; a purple ball is behind an orange block.",
    "Three objects: a pink cone, a cyan cube and a red cylinder.",
    "Ein grüner Würfel – 立方体 😀",
] * 20
CFG = dict(vocab_size=4096, num_sentinels=100, value_bins=100)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_tok")
    TextTokenizer.train(CORPUS, d, CFG)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return TextTokenizer.load(tok_dir)


def test_layout_fixed_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.sos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.sentinel_id(0) == 4 and tok.sentinel_id(1) == 5  # as 4M: [S_1] has id 5
    assert tok.num_sentinels == 100 and tok.value_bins == 100
    assert tok.value_id(0, 0) == 104 and tok.value_id(3, 99) == 503
    assert tok.vocab_size == 4096 == modalities.TEXT_VOCAB
    pieces = {0: "[PAD]", 1: "[UNK]", 2: "[SOS]", 3: "[EOS]", 4: "[S_0]", 103: "[S_99]",
              104: "v0=0", 204: "v1=0", 503: "v3=99", 504: "<0x00>", 759: "<0xFF>"}
    for i, p in pieces.items():
        assert tok.id_to_piece(i) == p
    # The layout is computable without a model (masking/model code rely on that).
    lay = TextLayout(100, 100)
    assert lay.sentinel_id(7) == tok.sentinel_id(7) and lay.value_id(2, 5) == tok.value_id(2, 5)
    assert lay.first_learned_id == 760
    with pytest.raises(ValueError, match="sentinel index 100"):
        tok.sentinel_id(100)
    with pytest.raises(ValueError, match="value bin 100"):
        tok.value_id(0, 100)


def test_learned_words_and_padding(tok):
    ids = tok.encode("a red cube")
    assert all(i >= TextLayout().first_learned_id for i in ids)
    assert len(ids) <= 4  # BPE learns whole words of the corpus
    assert 0 < tok.num_learned_pieces < 4096 - 760
    last = tok.vocab_size - 1  # padding pieces exist, decode, and are never produced
    assert tok.id_to_piece(last).startswith("[UNUSED_")
    assert tok.decode([last]) == tok.id_to_piece(last)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_any_unicode(tok, s):
    ids = tok.encode(s, allow_empty=True)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


_WORD = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=6),
    st.sampled_from(["v0=3", "v3=99", "[S_0]", "[S_12]", "[EOS]", "v0=100", "v0=03", "[S_100]",
                     "\u2581", "v1=5,", " ", ""]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_WORD, max_size=8), st.lists(st.sampled_from([" ", "  ", "", "\t"]), max_size=8))
def test_roundtrip_mixed_special_words(tok, words, seps):
    s = "".join(w + (seps[k] if k < len(seps) else " ") for k, w in enumerate(words))
    assert tok.decode(tok.encode(s, allow_empty=True)) == s


def test_special_words_are_single_ids(tok):
    v = tok.value_id
    ids = tok.encode("v0=3 v1=7 v2=40 v3=99 cube")
    assert ids[:4] == [v(0, 3), v(1, 7), v(2, 40), v(3, 99)]
    assert tok.decode(ids) == "v0=3 v1=7 v2=40 v3=99 cube"
    ids = tok.encode("a red [S_0] on the [S_1]")
    assert tok.sentinel_id(0) in ids and ids[-1] == tok.sentinel_id(1)
    # Not special: out of range, non-canonical digits, glued to other characters.
    for s in ("v0=100", "v0=03", "xv0=3", "[S_0],", "v4=1"):
        ids = tok.encode(s)
        assert not any(4 <= i < 504 for i in ids), s
        assert tok.decode(ids) == s


def test_decode_drops_pad_and_renders_specials(tok):
    ids = [tok.sos_id] + tok.encode("red [S_0] cube") + [tok.eos_id, 0, 0]
    assert tok.decode(ids) == "[SOS] red [S_0] cube [EOS]"
    assert tok.decode([0, 0]) == ""
    assert tok.decode(np.asarray(tok.encode("red cube"), np.int32)) == "red cube"
    assert tok.decode([]) == ""


def test_errors(tok):
    with pytest.raises(ValueError, match="empty text"):
        tok.encode("")
    assert tok.encode("", allow_empty=True) == []
    with pytest.raises(TypeError, match="encodes str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("ab\ud800c")
    with pytest.raises(ValueError, match=r"token id 4096 at position 1 is outside .*\[0, 4096\)"):
        tok.decode([5, 4096])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode([[1, 2]])


def test_deterministic_training(tmp_path, tok):
    a = TextTokenizer.train(CORPUS, tmp_path / "a", CFG)
    b = TextTokenizer.train(list(reversed(CORPUS)), tmp_path / "b", CFG)
    assert (tmp_path / "a" / "text.model").read_bytes() == (tmp_path / "b" / "text.model").read_bytes()
    assert a.config_hash == b.config_hash == tok.config_hash
    other = TextTokenizer.train(CORPUS[:3], None, CFG)
    assert other.config_hash != tok.config_hash
    assert a.version == text_lib.VERSION


def test_save_load_and_bad_files(tmp_path, tok_dir, tok):
    side = json.loads((tok_dir / "text.json").read_text())
    assert side["layout"]["first_learned"] == 760 and side["vocab_size"] == 4096
    with pytest.raises(FileNotFoundError, match="text.model"):
        TextTokenizer.load(tmp_path)
    d = tmp_path / "copy"
    d.mkdir()
    (d / "text.json").write_text(json.dumps(side))
    (d / "text.model").write_bytes((tok_dir / "text.model").read_bytes()[:-7] + b"garbage")
    with pytest.raises(ValueError, match="sha256"):
        TextTokenizer.load(d)
    (d / "text.json").write_text(json.dumps({k: v for k, v in side.items() if k != "value_bins"}))
    with pytest.raises(ValueError, match="value_bins"):
        TextTokenizer.load(d)


def test_config_errors():
    with pytest.raises(ValueError, match="leaves no room"):
        TextTokenizer.train(CORPUS, None, dict(vocab_size=600))
    with pytest.raises(ValueError, match="corpus is empty"):
        TextTokenizer.train(["", "   "], None, CFG)
    with pytest.raises(TypeError, match="must be str"):
        TextTokenizer.train([3], None, CFG)

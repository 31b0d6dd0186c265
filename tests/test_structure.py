"""Structure as text: boxes, metadata and palettes -> text -> tokens -> text -> structure."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fourm.data.scenes import generate_scene
from fourm.tokenizers import structure as S
from fourm.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def tok():
    captions = [generate_scene(0, i, 32)["caption"] for i in range(40)]
    return TextTokenizer.train(captions + ["sphere cube cylinder cone"], None, dict(value_bins=100))


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(0, i, 64) for i in range(6)]


def _via_tokens(tok, text):
    return tok.decode(tok.encode(text, allow_empty=True))


def test_scene_boxes_roundtrip_through_tokens(tok, scenes):
    for s in scenes:
        text = S.boxes_to_text(s["boxes"], 64, tok.value_bins)
        ids = tok.encode(text, allow_empty=True)
        # Four value ids open every box, and value ids appear nowhere else.
        n_val = sum(tok.value_id(0, 0) <= i <= tok.value_id(3, 99) for i in ids)
        assert n_val == 4 * len(s["boxes"])
        back = S.text_to_boxes(tok.decode(ids), 64, tok.value_bins)
        assert [b["class"] for b in back] == [b["class"] for b in s["boxes"]]
        for b, o in zip(back, s["boxes"]):
            # Integer pixel corners survive exactly: a bin (64/99 px) is finer than a pixel.
            assert np.allclose(b["box"], o["box"], atol=64 / 99 / 2 + 1e-9)
            assert np.round(b["box"]).astype(int).tolist() == list(o["box"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1),
                          st.sampled_from(["cube", "traffic light", "cone"])), max_size=5),
       st.integers(16, 512), st.integers(16, 512), st.sampled_from([10, 100, 1000]))
def test_boxes_within_half_bin(tok, raw, h, w, bins):
    boxes = [{"class": c, "box": [min(a, b) * w, min(c_, d) * h, max(a, b) * w, max(c_, d) * h]}
             for a, c_, b, d, c in raw]
    back = S.text_to_boxes(S.boxes_to_text(boxes, (h, w), bins), (h, w), bins)
    assert len(back) == len(boxes)
    for b, o in zip(back, boxes):
        assert b["class"] == o["class"]
        err = np.abs(np.subtract(b["box"], o["box"]))
        assert np.all(err <= np.array([w, h, w, h]) / (bins - 1) / 2 + 1e-9)


def test_boxes_format_and_errors():
    text = S.boxes_to_text([{"class": "cube", "box": [0, 32, 64, 64]}], 64, 100)
    assert text == "v0=0 v1=50 v2=99 v3=99 cube"
    assert S.boxes_to_text([], 64) == ""
    assert S.text_to_boxes("", 64) == []
    with pytest.raises(ValueError, match="box 0: corners out of order"):
        S.boxes_to_text([{"class": "cube", "box": [10, 0, 5, 4]}], 64)
    with pytest.raises(ValueError, match="4 finite numbers"):
        S.boxes_to_text([{"class": "cube", "box": [1, 2, 3]}], 64)
    with pytest.raises(ValueError, match="'class' and 'box'"):
        S.boxes_to_text([{"box": [1, 2, 3, 4]}], 64)
    with pytest.raises(ValueError, match="class name"):
        S.boxes_to_text([{"class": "v0=3", "box": [1, 2, 3, 4]}], 64)
    bad = "v0=1 v1=2 v2=3 v3=4 cube v0=5 v1=6 sphere v0=1 v1=1 v2=9 v3=9 cone"
    with pytest.raises(ValueError, match="word 5 is 'v0=5'"):
        S.text_to_boxes(bad, 64)
    assert [b["class"] for b in S.text_to_boxes(bad, 64, strict=False)] == ["cube", "cone"]
    with pytest.raises(ValueError, match="class name"):
        S.text_to_boxes("v0=1 v1=2 v2=3 v3=4", 64)


def test_scene_metadata_roundtrip_through_tokens(tok, scenes):
    for s in scenes:
        meta = s["metadata"]
        text = S.metadata_to_text(meta, bins=tok.value_bins)
        assert len(tok.encode(text)) == 2 * len(meta)  # one v1= and one v0= id per field
        back = S.text_to_metadata(_via_tokens(tok, text), bins=tok.value_bins)
        assert set(back) == set(meta)
        for k, v in meta.items():
            f = S.METADATA_SPEC[k]
            want = min(max(v, f.min), f.max)
            assert abs(back[k] - want) <= S.metadata_tolerance(k) + 1e-9, k
        assert back["object_count"] == meta["object_count"] and isinstance(back["object_count"], int)


def test_metadata_spec_is_documented_and_consistent():
    idx = [f.index for f in S.METADATA_SPEC.values()]
    assert sorted(idx) == list(range(len(idx)))  # unique, dense, fixed
    for name, f in S.METADATA_SPEC.items():
        assert f.max > f.min and f.doc, name


def test_metadata_errors_and_clipping():
    with pytest.raises(ValueError, match=r"fields \['mood'\] are not in the metadata spec"):
        S.metadata_to_text({"brightness": 0.5, "mood": 3})
    assert S.metadata_to_text({"brightness": 0.5, "mood": 3}, strict=False) == "v1=1 v0=50"
    with pytest.raises(ValueError, match="not finite"):
        S.metadata_to_text({"brightness": float("nan")})
    with pytest.raises(ValueError, match="expected a number"):
        S.metadata_to_text({"brightness": "bright"})
    assert S.text_to_metadata(S.metadata_to_text({"brightness": 7.0})) == {"brightness": 1.0}
    with pytest.raises(ValueError, match="field index"):
        S.text_to_metadata("v1=99 v0=3")
    assert S.text_to_metadata("v1=99 v0=3 v1=1 v0=0", strict=False) == {"brightness": 0.0}


def test_palette_roundtrip(tok, scenes):
    pal = S.palette_from_image(scenes[0]["rgb"], k=5)
    assert pal.dtype == np.uint8 and pal.shape[1] == 3 and 1 <= len(pal) <= 5
    np.testing.assert_array_equal(pal, S.palette_from_image(scenes[0]["rgb"], k=5))
    text = S.palette_to_text(pal, tok.value_bins)
    assert text.split()[0] == f"v0={len(pal)}"
    back = S.text_to_palette(_via_tokens(tok, text), tok.value_bins)
    assert back.shape == pal.shape
    assert np.abs(back.astype(int) - pal.astype(int)).max() <= 255 / 99 / 2 + 0.5
    assert S.text_to_palette(S.palette_to_text([])).shape == (0, 3)
    with pytest.raises(ValueError, match="colour 1"):
        S.text_to_palette("v0=2 v1=1 v2=2 v3=3 v1=4")
    with pytest.raises(ValueError, match="uint8"):
        S.palette_from_image(np.zeros((4, 4), np.uint8))

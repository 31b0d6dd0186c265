"""The registry's fields: validation of entries, users' modules (config field `modules`), and an
aligned folder / TFDS dataset carrying a registered field, including files that do not decode."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from fourm import modalities as reg
from fourm.data import folder, scenes

RES = 16


@pytest.fixture
def registry():
    """The registry as it was, restored after the test (registrations are process-global)."""
    fields, mods, loaded = dict(reg._FIELDS), {k: dict(v) for k, v in reg._REGISTRY.items()}, list(reg._LOADED)
    yield reg
    reg._FIELDS.clear(); reg._FIELDS.update(fields)
    reg._REGISTRY.clear(); reg._REGISTRY.update(mods)
    reg._LOADED[:] = loaded


def test_field_entries_are_checked(registry):
    with pytest.raises(ValueError, match="layout 'picture'"):
        reg.register_field(reg.Field("x", "picture"))
    with pytest.raises(ValueError, match="folder name"):
        reg.register_field(reg.Field("My Edges", "image", channels=1))
    with pytest.raises(ValueError, match="channels 1, 3 or 4"):
        reg.register_field(reg.Field("x", "image"))
    with pytest.raises(ValueError, match=r"reads \['npy'\], not \['bin'\]; give decode="):
        reg.register_field(reg.Field("x", "array", ("bin",)))
    with pytest.raises(ValueError, match="already registered"):
        reg.register_field(reg.Field("rgb", "image", channels=1))
    f = reg.register_field(reg.Field("edges", "image", channels=1))
    assert f.formats == ("png",) and reg.register_field(reg.Field("edges", "image", channels=1)) == f
    assert reg.field_for_name("segmentation").name == "semseg" and reg.field_for_name("nope") is None
    with pytest.raises(KeyError, match="unknown field 'nope'.*modules"):
        reg.field("nope")


def test_modules_from_a_file_a_dotted_name_and_the_config(registry, tmp_path, monkeypatch):
    from fourm.config import load_config

    (tmp_path / "mods_a.py").write_text(
        "from fourm import modalities as m\nm.register_field(m.Field('heat', 'array'))\n")
    (tmp_path / "mods_b.py").write_text(
        "from fourm import modalities as m\nm.register_field(m.Field('mask', 'labels'))\n")
    reg.load_modules([str(tmp_path / "mods_a.py")])
    assert reg.field("heat").layout == "array"
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("scenes", ["modules=mods_b"])
    assert tuple(cfg.modules) == ("mods_b",) and reg.field("mask").layout == "labels"
    assert reg.loaded_modules() == [str(tmp_path / "mods_a.py"), "mods_b"]
    # An installed package's entry point (group fourm.modalities) registers without any config.
    dist = tmp_path / "ep_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep_pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fourm.modalities]\nmine = ep_mods:setup\n")
    (tmp_path / "ep_mods.py").write_text(
        "from fourm import modalities as m\n"
        "def setup():\n    m.register_field(m.Field('palette_img', 'image', channels=3))\n")
    reg.load_modules()
    assert reg.field("palette_img").channels == 3
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz': ModuleNotFoundError"):
        reg.load_modules(["no_such_module_xyz"])
    with pytest.raises(ValueError, match="cannot import '.*missing.py': FileNotFoundError"):
        reg.load_modules([str(tmp_path / "missing.py")])


def _folder_with(root, field_name, files: dict, ext="png", num=3):
    samples = [scenes.generate_scene(0, i, RES) for i in range(num)]
    folder.write_dataset(root, ({k: s[k] for k in ("rgb", "semseg")} for s in samples), RES)
    spec = json.loads((root / "dataset.json").read_text())
    spec["modalities"][field_name] = ext
    (root / "dataset.json").write_text(json.dumps(spec))
    (root / field_name).mkdir()
    for stem, data in files.items():
        (root / field_name / f"{stem}.{ext}").write_bytes(data)
    return samples


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_registered_field_in_folder_writer_and_tfds(registry, tmp_path):
    from fourm.data import tfds_scenes

    edges = [np.random.default_rng(i).integers(0, 2, (RES, RES), dtype=np.uint8) * 255 for i in range(3)]
    files = {folder.stem_for(i): _png(e) for i, e in enumerate(edges)}
    _folder_with(tmp_path / "f", "edges", files)
    with pytest.raises(folder.FolderError, match="unknown modality 'edges'.*modules"):
        folder.AlignedFolder(tmp_path / "f")
    reg.register_field(reg.Field("edges", "image", channels=1))
    ds = folder.AlignedFolder(tmp_path / "f")
    assert ds.modalities == ["rgb", "semseg", "edges"]
    assert ds[1]["edges"].shape == (RES, RES, 1) and np.array_equal(ds[1]["edges"][..., 0], edges[1])
    # The writer takes registered fields too, and the TFDS records decode to the same values.
    folder.write_dataset(tmp_path / "g", iter([ds[i] for i in range(3)]), RES)
    again = folder.AlignedFolder(tmp_path / "g")
    assert again.exts["edges"] == "png" and np.array_equal(again[2]["edges"], ds[2]["edges"])
    path = tfds_scenes.build_from_folder(tmp_path / "f", tmp_path / "tfds")
    src = tfds_scenes.SampleSource(path)
    for i in range(3):
        assert np.array_equal(src[i]["edges"], ds[i]["edges"]) and np.array_equal(src[i]["rgb"], ds[i]["rgb"])


def test_files_that_do_not_decode_name_the_file_and_the_reason(registry, tmp_path):
    good = _png(np.zeros((RES, RES), np.uint8))
    _folder_with(tmp_path / "f", "edges", {"000000": good, "000001": b"\x89PNG broken",
                                           "000002": _png(np.zeros((RES, RES, 3), np.uint8))})
    reg.register_field(reg.Field("edges", "image", channels=1))
    errors = folder.AlignedFolder(tmp_path / "f").validate(raise_errors=False)
    assert [(e.sample, e.modality) for e in errors] == [("000001", "edges"), ("000002", "edges")]
    assert errors[0].path.endswith("edges/000001.png") and "unreadable image" in errors[0].problem
    assert "expected L (8-bit single channel) image, got mode 'RGB'" in errors[1].problem

    # A format of the user's own: their decode's exceptions and wrong outputs are reported alike.
    def decode(data: bytes):
        if data.startswith(b"bad"):
            raise ValueError("checksum mismatch")
        return np.frombuffer(data, np.uint8).reshape(RES, RES - int(data[0] == 1)).astype(np.float32)

    reg.register_field(reg.Field("heat", "array", ("bin",), decode=decode))
    ok = np.full(RES * RES, 7, np.uint8).tobytes()
    _folder_with(tmp_path / "h", "heat", {"000000": ok, "000001": b"bad" + ok[3:],
                                          "000002": np.ones(RES * (RES - 1), np.uint8).tobytes()},
                 ext="bin")
    f = folder.AlignedFolder(tmp_path / "h", skip_bad=True)
    assert f.stems == ["000000"] and f[0]["heat"].dtype == np.float32 and f[0]["heat"][0, 0] == 7
    why = {e.sample: e.problem for e in f.skipped}
    assert why["000001"] == ("cannot decode .bin file with 'heat''s decode: ValueError: "
                             "checksum mismatch")
    assert why["000002"] == f"wrong shape: expected ({RES}, {RES}), got ({RES}, {RES - 1})"


def test_codec_registration(monkeypatch):
    from fourm.tokenizers import codecs

    monkeypatch.setattr(codecs, "CODECS", dict(codecs.CODECS))

    @codecs.register_codec
    class Heat(codecs.Codec):
        kind = "heat"
        in_channels = out_channels = 1

    import ml_collections

    cfg = ml_collections.ConfigDict(dict(modality="heat", codec=dict(kind="heat")))
    assert isinstance(codecs.make_codec(cfg), Heat)
    with pytest.raises(ValueError, match="already registered"):
        codecs.register_codec(type("Other", (codecs.Codec,), {"kind": "heat"}))
    with pytest.raises(ValueError, match="Codec subclass"):
        codecs.register_codec(int)

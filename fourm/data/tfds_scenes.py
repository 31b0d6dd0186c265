"""TFDS builders for aligned folders and for the scene generator, stored as ArrayRecord.

Both are ordinary `tfds.core.GeneratorBasedBuilder`s prepared with `file_format="array_record"`,
which TFDS runs without TensorFlow as long as no feature needs TF to *encode*: images are handed
over as PIL images (TFDS encodes those with Pillow), arrays go through `tfds.features.Tensor`
with byte/zlib encoding (exact for float32/float64, unlike the float_list default, which rounds
float64 to float32). Records are written in sample order (`disable_shuffling`), keyed by stem.

    path = build_from_folder("data/scenes_64", data_dir="data/tfds")       # -> .../aligned_folder/1.0.0
    raw = tfds.data_source("aligned_folder", data_dir="data/tfds", split="train")  # grain-ready
    src = SampleSource(path)           # same records decoded like AlignedFolder[i]
    assert equal(src[3], AlignedFolder("data/scenes_64")[3])

Stored features (H, W from the dataset): stem (text), rgb uint8 [H, W, 3] (PNG), depth float32
[H, W] (metres, zlib), normals uint8 [H, W, 3] (PNG, the folder's encoding; float32 if the folder
stores .npy normals), semseg uint8 [H, W, 1] (PNG), instance int32 [H, W] (zlib), boxes / metadata
(JSON text), caption (text), intrinsics float64 [4] = fx, fy, cx, cy; a registered field by its layout
(images PNG, arrays zlib, JSON as text). `record_to_sample` turns a
raw record into the `generate_scene` dict. The dataset's dataset.json travels in
`builder.info.metadata` (classes, conventions, source).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from fourm import modalities as registry
from fourm.data import fields as fields_lib
from fourm.data import folder as folder_lib
from fourm.data import scenes as scenes_lib

DATASET_VERSION = "1.0.0"
_ZLIB = tfds.features.Encoding.ZLIB


def _feature(f: registry.Field, ext: str, h: int, w: int):
    if not f.is_image_like:  # boxes, metadata, text: JSON text or text
        return tfds.features.Text()
    shape, dtype = fields_lib.expected_array(f, (h, w))
    if f.layout == "normals" and ext == "png":  # stored as the folder's uint8 encoding
        return tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format="png")
    if f.layout == "image":
        return tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format="png")
    if f.layout == "labels":
        return tfds.features.Image(shape=(h, w, 1), dtype=np.uint8, encoding_format="png")
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=_ZLIB)


def features_for(resolution, exts: Mapping[str, str],
                 with_intrinsics: bool = True) -> tfds.features.FeaturesDict:
    """The feature spec of a dataset with these fields (`exts` as in dataset.json)."""
    h, w = resolution
    spec: dict[str, Any] = {"stem": tfds.features.Text()}
    for f in registry.fields():
        if f.name in exts:
            spec[f.name] = _feature(f, exts[f.name], h, w)
    if with_intrinsics:
        spec["intrinsics"] = tfds.features.Tensor(shape=(4,), dtype=np.float64,
                                                  encoding=tfds.features.Encoding.BYTES)
    return tfds.features.FeaturesDict(spec)


def sample_to_example(stem: str, sample: Mapping[str, Any], normals_png: bool = True) -> dict:
    """A sample dict (normals as float unit vectors or, raw, as uint8) -> a TFDS example."""
    ex: dict[str, Any] = {"stem": stem}
    for mod, value in sample.items():
        if mod == "intrinsics":
            ex[mod] = np.array([value[k] for k in folder_lib.INTRINSIC_KEYS], np.float64)
            continue
        f = registry.field(mod)
        if f.layout == "normals" and normals_png:
            u8 = value if value.dtype == np.uint8 else folder_lib.encode_normals(value)
            ex[mod] = Image.fromarray(u8)
        elif f.layout in ("image", "labels"):
            arr = np.asarray(value, np.uint8)
            ex[mod] = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
        elif f.is_image_like:
            ex[mod] = np.asarray(value, fields_lib.expected_array(f, np.shape(value)[:2])[1])
        elif f.layout in ("boxes", "json"):
            ex[mod] = json.dumps(value, ensure_ascii=False, allow_nan=False)
        else:
            ex[mod] = value
    return ex


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def record_to_sample(record: Mapping[str, Any]) -> dict:
    """A raw TFDS record (numpy, as `tfds.data_source` returns) -> the `generate_scene` dict."""
    out: dict[str, Any] = {}
    for mod, value in record.items():
        if mod == "stem":
            continue
        if mod == "intrinsics":
            out[mod] = {k: float(v) for k, v in zip(folder_lib.INTRINSIC_KEYS, value)}
            continue
        f = registry.field(mod)
        if f.layout == "normals":
            out[mod] = folder_lib.decode_normals(value) if value.dtype == np.uint8 else value
        elif f.layout == "labels":
            out[mod] = value[..., 0]
        elif f.layout in ("boxes", "json"):
            out[mod] = json.loads(_text(value))
        elif f.layout == "text":
            out[mod] = _text(value)
        else:
            out[mod] = value
    return {m: out[m] for m in [*registry.field_names(), "intrinsics"] if m in out}


class _ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose name, features and split generators are given at construction (the
    pattern of tfds' adhoc builder, whose tf.data type checks need TF, which we do not have)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Initial release."}

    def __init__(self, *, name: str, features: tfds.features.FeaturesDict,
                 splits: Mapping[str, Callable[[], Iterator[tuple[str, dict]]]], metadata: Mapping[str, Any],
                 description: str, data_dir: str | os.PathLike):
        self.name = name
        self._features, self._splits = features, dict(splits)
        self._meta, self._description = dict(metadata), description
        super().__init__(data_dir=os.fspath(data_dir), file_format="array_record")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' default probes the `importlib_resources` backport, which it only installs for
        # Python < 3.9; the answer is this file either way.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self._description, features=self._features,
                                     disable_shuffling=True, metadata=tfds.core.MetadataDict(self._meta))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: make() for split, make in self._splits.items()}

    def _generate_examples(self, **kwargs):  # splits come from the constructor
        raise NotImplementedError

    def prepare(self, overwrite: bool = False) -> Path:
        """download_and_prepare (nothing is downloaded); returns the dataset's version folder."""
        if overwrite and Path(self.data_dir).exists():
            shutil.rmtree(self.data_dir)
        self.download_and_prepare(file_format="array_record")
        return Path(self.data_dir)


class AlignedFolderBuilder(_ArrayRecordBuilder):
    """An aligned folder as a one-split TFDS dataset (bad samples raise, or with skip_bad are
    left out and listed in `self.folder.skipped`)."""

    def __init__(self, folder: str | os.PathLike | folder_lib.AlignedFolder, *, data_dir: str | os.PathLike,
                 name: str = "aligned_folder", split: str = "train", skip_bad: bool = False):
        self.folder = folder if isinstance(folder, folder_lib.AlignedFolder) else folder_lib.AlignedFolder(
            folder, skip_bad=skip_bad)
        f = self.folder
        has_intr = f.intrinsics is not None or (
            "metadata" in f.exts and len(f) > 0 and "intrinsics" in f.read(f.stems[0]))
        png_normals = f.exts.get("normals") == "png"

        def examples():
            for stem in f.stems:
                sample = f.read(stem, raw=True)
                if has_intr and "intrinsics" not in sample:
                    raise folder_lib.FolderError(
                        "no intrinsics: dataset.json has none and metadata lacks fx, fy, cx, cy (other "
                        "samples have them)", sample=stem, modality="metadata", path=f.path(stem, "metadata"))
                yield stem, sample_to_example(stem, sample, normals_png=png_normals)

        meta = {k: v for k, v in f.spec.items() if k != "modalities"}
        meta |= {"modalities": f.exts, "folder": str(f.root)}
        super().__init__(name=name, features=features_for(f.resolution, f.exts, bool(has_intr)),
                         splits={split: examples}, metadata=meta, data_dir=data_dir,
                         description=f"Aligned folder {f.root} ({len(f)} samples).")


class ScenesBuilder(_ArrayRecordBuilder):
    """Procedural scenes straight from the generator. `splits` maps a split name to a
    (start, num) range of scene indices; records equal those of export_scenes -> folder -> TFDS."""

    def __init__(self, *, data_dir: str | os.PathLike, seed: int = 0, resolution: int = 64,
                 splits: Mapping[str, tuple[int, int]] = (("train", (0, 1000)),), workers: int = 1,
                 config: scenes_lib.SceneConfig = scenes_lib.SceneConfig(), name: str = "fourm_scenes"):
        splits = dict(splits)
        exts = folder_lib.default_exts(scenes_lib.FIELDS)
        end = max(s + n for s, n in splits.values())
        width = max(6, len(str(end - 1)))

        def make(start, num):
            def examples():
                samples = scenes_lib.generate_scenes(seed, start, num, resolution, workers, config)
                for i, sample in enumerate(samples):
                    stem = folder_lib.stem_for(start + i, width)
                    yield stem, sample_to_example(stem, sample)
            return examples

        intr = scenes_lib.render_lib.intrinsics(config.fov_deg, resolution, resolution)
        meta = {"format": folder_lib.FORMAT_NAME, "resolution": [resolution, resolution], "modalities": exts,
                "intrinsics": intr, "classes": scenes_lib.CLASSES, "conventions": folder_lib.CONVENTIONS,
                "source": {"generator": "fourm.data.scenes", "seed": seed,
                           "splits": {k: list(v) for k, v in splits.items()},
                           "config": scenes_lib.dataclasses.asdict(config)}}
        super().__init__(name=name, features=features_for((resolution, resolution), exts),
                         splits={k: make(*v) for k, v in splits.items()}, metadata=meta, data_dir=data_dir,
                         description=f"fourm procedural scenes at {resolution} px, seed {seed}.")


def build_from_folder(folder: str | os.PathLike, data_dir: str | os.PathLike, *, name: str = "aligned_folder",
                      split: str = "train", skip_bad: bool = False, overwrite: bool = False) -> Path:
    builder = AlignedFolderBuilder(folder, data_dir=data_dir, name=name, split=split, skip_bad=skip_bad)
    return builder.prepare(overwrite)


def build_from_scenes(data_dir: str | os.PathLike, *, seed: int = 0, resolution: int = 64, num: int = 1000,
                      num_val: int = 0, start: int = 0, workers: int = 1, name: str = "fourm_scenes",
                      overwrite: bool = False) -> Path:
    """Train split = scenes [start, start + num), validation = the next num_val scenes."""
    splits = {"train": (start, num)} | ({"validation": (start + num, num_val)} if num_val else {})
    return ScenesBuilder(data_dir=data_dir, seed=seed, resolution=resolution, splits=splits, workers=workers,
                         name=name).prepare(overwrite)


class SampleSource:
    """Random access to a prepared dataset, decoded like `AlignedFolder[i]` (len, getitem; usable
    as a grain data source). `raw` is the underlying `tfds` ArrayRecord data source."""

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train"):
        self.dataset_dir, self.split = os.fspath(dataset_dir), split
        builder = tfds.builder_from_directory(self.dataset_dir)
        if split not in builder.info.splits:
            raise KeyError(f"split {split!r} not in {self.dataset_dir}; "
                           f"splits: {sorted(builder.info.splits)}")
        self.metadata = dict(builder.info.metadata or {})
        self.raw = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict:
        return record_to_sample(self.raw[i])

    def stem(self, i: int) -> str:
        return _text(self.raw[i]["stem"])

    def __getstate__(self):  # reopen in worker processes instead of pickling file handles
        return {"dataset_dir": self.dataset_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(state["dataset_dir"], state["split"])

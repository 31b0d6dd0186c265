"""Random-access sample sources for pre-tokenization (len + __getitem__, picklable for workers).

Every source yields samples in the scene generator's layout (`fourm.data.scenes`): image fields
`rgb`/`depth`/`normals`/`semseg` as numpy arrays, `caption` str, `boxes` list of
`{"class", "box": [x0, y0, x1, y1]}`, `metadata` dict of numbers.

  scenes  `fourm.data.scenes.generate_scene(seed, start + i, resolution)`
  folder  an aligned folder (`fourm.data.folder.AlignedFolder`)
  tfds    a TFDS dataset prepared as ArrayRecord (`fourm.data.tfds_scenes.SampleSource`)
"""

from __future__ import annotations


class SceneSource:
    def __init__(self, seed: int, start: int, count: int, resolution: int):
        if count < 1 or start < 0:
            raise ValueError(f"scene source needs count >= 1 and start >= 0, got {count}, {start}")
        self.seed, self.start = int(seed), int(start)
        self.count, self.resolution = int(count), int(resolution)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        from fourm.data.scenes import generate_scene

        if not 0 <= i < self.count:
            raise IndexError(f"scene index {i} outside [0, {self.count})")
        return generate_scene(self.seed, self.start + int(i), self.resolution)

    def info(self) -> dict:
        return dict(kind="scenes", seed=self.seed, start=self.start, count=self.count,
                    resolution=self.resolution)


class FolderSource:
    def __init__(self, root: str, start: int = 0, count: int = -1):
        from fourm.data.folder import AlignedFolder

        self.root, self._ds = str(root), AlignedFolder(root)
        n = len(self._ds)
        self.start = int(start)
        self.count = n - self.start if count < 0 else int(count)
        if self.start < 0 or self.count < 1 or self.start + self.count > n:
            raise ValueError(f"aligned folder {root} has {n} samples; cannot take "
                             f"[{self.start}, {self.start + self.count})")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        return dict(self._ds[self.start + int(i)])

    def __getstate__(self):  # re-open in worker processes instead of pickling file handles
        return dict(root=self.root, start=self.start, count=self.count)

    def __setstate__(self, state):
        self.__init__(state["root"], state["start"], state["count"])

    def info(self) -> dict:
        return dict(kind="folder", root=self.root, start=self.start, count=self.count)


class TfdsSource:
    """A prepared TFDS dataset folder (`fourm.data.tfds_scenes`: .../<name>/<version>), one split."""

    def __init__(self, dataset_dir: str, split: str = "train"):
        from fourm.data.tfds_scenes import SampleSource

        self.dataset_dir, self.split = str(dataset_dir), split
        self._src = SampleSource(dataset_dir, split)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict:
        return self._src[int(i)]

    def __getstate__(self):  # re-open in worker processes instead of pickling file handles
        return dict(dataset_dir=self.dataset_dir, split=self.split)

    def __setstate__(self, state):
        self.__init__(**state)

    def info(self) -> dict:
        return dict(kind="tfds", dataset_dir=self.dataset_dir, split=self.split)


def make_source(cfg) -> SceneSource | FolderSource | TfdsSource:
    """A source from a config section `kind` + its fields (see configs/pretokenize.py)."""
    kind = cfg.kind
    if kind == "scenes":
        return SceneSource(cfg.seed, cfg.start, cfg.count, cfg.resolution)
    if kind == "folder":
        if not cfg.folder:
            raise ValueError("source.kind='folder' needs source.folder (the aligned folder's path)")
        return FolderSource(cfg.folder, cfg.start, cfg.count)
    if kind == "tfds":
        if not cfg.tfds_dir:
            raise ValueError("source.kind='tfds' needs source.tfds_dir (a prepared dataset "
                             "folder, e.g. data/tfds/fourm_scenes/1.0.0)")
        return TfdsSource(cfg.tfds_dir, cfg.tfds_split)
    raise ValueError(f"source.kind must be 'scenes', 'folder' or 'tfds', got {kind!r}")

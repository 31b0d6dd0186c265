"""Reading and validating aligned folders (import `AlignedFolder` from `fourm.data.folder`)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fourm.data.folder import (EXTENSIONS, FORMAT_NAME, INTRINSIC_KEYS, MODALITIES, FolderError,
                               atomic_write_bytes, decode_depth_png16, decode_normals)
from fourm.io import PathEscapeError, inside

# Allowed PIL modes per image modality, with what they mean in words (for error messages).
_RGB_MODES = {"RGB": "8-bit RGB"}
_LABEL_MODES = {"L": "8-bit single channel", "P": "8-bit palette"}
_WIDE_MODES = {"L": "8-bit", "I;16": "16-bit", "I;16B": "16-bit", "I": "32-bit"}


def _load_json_file(path: Path, what: str, sample=None, modality=None):
    raw = _read_bytes(path, sample, modality)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FolderError(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})", sample=sample,
                          modality=modality, path=path) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FolderError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", sample=sample,
                          modality=modality, path=path) from None


def _read_bytes(path: Path, sample, modality) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FolderError(f"cannot read file: {e.strerror or e}", sample=sample, modality=modality,
                          path=path) from None


class AlignedFolder:
    """Random-access reader of an aligned folder: `len(f)`, `f.stems`, `f[i] -> dict` with the
    keys and dtypes of `fourm.data.scenes.generate_scene` (for the modalities present).

    skip_bad=False: structural problems (missing files, stems in only some modalities) raise
    FolderError when opening, content problems when the sample is read (`validate()` reads all).
    skip_bad=True: opening reads every sample once and keeps only the good ones; `skipped` lists
    the rest with the reason, `write_report(path)` saves that list as JSON (also done at opening
    when `report_path` is given).
    """

    def __init__(self, root: str | os.PathLike, skip_bad: bool = False, *,
                 modalities: Sequence[str] | None = None, report_path: str | os.PathLike | None = None,
                 progress: bool = False):
        self.root = Path(root)
        self.skip_bad = skip_bad
        self.spec = self._load_spec()
        self.exts: dict[str, str] = dict(self.spec["modalities"])
        if modalities is not None:
            unknown = [m for m in modalities if m not in self.exts]
            if unknown:
                raise FolderError(f"modalities {unknown} requested but dataset.json has {sorted(self.exts)}",
                                  path=self.root / "dataset.json")
            self.exts = {m: self.exts[m] for m in modalities}
        self.modalities = [m for m in MODALITIES if m in self.exts]
        self.resolution = tuple(self.spec["resolution"])
        self.intrinsics = self.spec.get("intrinsics")
        self.classes = self.spec.get("classes")
        self.depth_scale = float(self.spec.get("depth_scale", 0.001))
        all_stems, problems = self._scan()
        expected = self.spec.get("num_samples")
        if isinstance(expected, int) and expected != len(all_stems) and not problems:
            msg = (f"dataset.json says num_samples={expected} but the modality folders hold "
                   f"{len(all_stems)} distinct stems (samples missing in every modality, or extra ones)")
            if not skip_bad:
                raise FolderError(msg, modality="dataset.json", path=self.root / "dataset.json")
            warnings.warn(msg)
        self.skipped: list[FolderError] = []
        if problems and not skip_bad:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            first = problems[0]
            raise FolderError(first.problem + more, sample=first.sample, modality=first.modality,
                              path=first.path)
        bad = {p.sample for p in problems}
        self.skipped.extend(problems)
        self.stems = [s for s in all_stems if s not in bad]
        if skip_bad:
            self._drop_unreadable(progress)
        if report_path is not None:
            self.write_report(report_path)

    # --- dataset.json -------------------------------------------------------------------------
    def _load_spec(self) -> dict:
        path = self.root / "dataset.json"
        if not self.root.is_dir():
            raise FolderError("not a directory", path=self.root)
        if not path.exists():
            raise FolderError("missing dataset.json (it names the modalities and their file types, the "
                              "resolution and the camera intrinsics; see docs/data_format.md)", path=path)
        try:
            inside(self.root, path.name, "dataset.json")
        except PathEscapeError as e:
            raise FolderError(e.reason, modality="dataset.json", path=path) from None
        spec = _load_json_file(path, "dataset.json", modality="dataset.json")

        def bad(problem):
            return FolderError(problem, modality="dataset.json", path=path)

        if not isinstance(spec, dict):
            raise bad(f"expected a JSON object, got {type(spec).__name__}")
        if spec.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise bad(f"format is {spec.get('format')!r}, expected {FORMAT_NAME!r}")
        mods = spec.get("modalities")
        if not isinstance(mods, dict) or not mods:
            raise bad("'modalities' must be a non-empty object {modality: file extension}")
        for m, ext in mods.items():
            if m not in EXTENSIONS:
                raise bad(f"unknown modality {m!r}; known: {MODALITIES}")
            if ext not in EXTENSIONS[m]:
                raise bad(f"modality {m!r} has extension {ext!r}; allowed: {list(EXTENSIONS[m])}")
        res = spec.get("resolution")
        if not (isinstance(res, list) and len(res) == 2 and all(isinstance(r, int) and r > 0 for r in res)):
            raise bad(f"'resolution' must be [height, width] in pixels, got {res!r}")
        intr = spec.get("intrinsics")
        if intr is not None and not (isinstance(intr, dict) and all(
            isinstance(intr.get(k), (int, float)) for k in INTRINSIC_KEYS)):
            raise bad(f"'intrinsics' must be null or an object with numbers {list(INTRINSIC_KEYS)}, "
                      f"got {intr!r}")
        return spec

    # --- structure ------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[str], list[FolderError]]:
        files: dict[str, dict[str, str]] = {}  # modality -> stem -> ext
        for mod in self.modalities:
            d = self.root / mod
            found: dict[str, str] = {}
            if d.is_dir():
                for entry in os.scandir(d):
                    if entry.name.startswith(".") or not entry.is_file():
                        continue  # hidden files, e.g. temporaries of an interrupted atomic write
                    stem, _, ext = entry.name.rpartition(".")
                    if stem and (stem not in found or ext == self.exts[mod]):
                        found[stem] = ext
            files[mod] = found
        stems = sorted(set().union(*(f.keys() for f in files.values())))
        problems = []
        for stem in stems:
            present = [m for m in self.modalities if stem in files[m]]
            for mod in self.modalities:
                ext = files[mod].get(stem)
                if ext == self.exts[mod]:
                    continue
                expected = f"{mod}/{stem}.{self.exts[mod]}"
                if ext is not None:
                    why = (f"missing file {expected}; found {mod}/{stem}.{ext} but dataset.json says "
                           f"{mod} is .{self.exts[mod]}")
                elif len(present) == 1:
                    why = f"missing file {expected}: stem {stem!r} is present only in modality {present[0]!r}"
                else:
                    why = f"missing file {expected} (stem present in: {', '.join(present)})"
                problems.append(FolderError(why, sample=stem, modality=mod, path=self.root / expected))
                break  # one problem per sample is enough to name it
        return stems, problems

    def _drop_unreadable(self, progress: bool) -> None:
        good = []
        for stem, err in zip(self.stems, self._check_all(progress)):
            if err is None:
                good.append(stem)
            else:
                self.skipped.append(err)
        self.stems = good

    def _check_all(self, progress: bool):
        from tqdm.auto import tqdm

        for stem in tqdm(self.stems, desc="validating", unit="sample", disable=not progress):
            try:
                self.read(stem)
                yield None
            except FolderError as e:
                yield e

    def validate(self, raise_errors: bool = True, progress: bool = False) -> list[FolderError]:
        """Read every sample; return all problems (raise the first one if `raise_errors`)."""
        errors = [e for e in self._check_all(progress) if e is not None]
        if errors and raise_errors:
            more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
            e = errors[0]
            raise FolderError(e.problem + more, sample=e.sample, modality=e.modality, path=e.path)
        return errors

    def write_report(self, path: str | os.PathLike) -> Path:
        report = {"folder": str(self.root), "kept": len(self.stems), "skipped": len(self.skipped),
                  "samples": [e.to_json() for e in self.skipped]}
        atomic_write_bytes(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        return Path(path)

    # --- samples --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.read(self.stems[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def path(self, stem: str, mod: str) -> Path:
        return self.root / mod / f"{stem}.{self.exts[mod]}"

    def read(self, stem: str, raw: bool = False) -> dict[str, Any]:
        """Decode and check one sample. raw=True keeps PNG normals as uint8 (their stored form)."""
        out: dict[str, Any] = {}
        for mod in self.modalities:
            out[mod] = self._read_modality(stem, mod, raw)
        meta = out.get("metadata")
        if meta is not None and all(k in meta for k in INTRINSIC_KEYS):
            out["intrinsics"] = {k: float(meta.pop(k)) for k in INTRINSIC_KEYS}
        elif self.intrinsics is not None:
            out["intrinsics"] = {k: float(self.intrinsics[k]) for k in INTRINSIC_KEYS}
        return out

    def _read_modality(self, stem: str, mod: str, raw: bool):
        path, ext = self.path(stem, mod), self.exts[mod]

        def fail(problem):
            return FolderError(problem, sample=stem, modality=mod, path=path)

        try:  # a symlink (or '..') must not make a dataset read files outside itself
            inside(self.root, Path(mod) / path.name, "file")
        except PathEscapeError as e:
            raise fail(e.reason) from None

        h, w = self.resolution
        if ext == "npy":
            arr = self._load_npy(path, fail)
            shape = (h, w) if mod == "depth" else (h, w, 3)
            if arr.dtype != np.float32:
                raise fail(f"wrong dtype: expected float32, got {arr.dtype}")
            if arr.shape != shape:
                raise fail(f"wrong shape: expected {shape}, got {arr.shape}")
            self._check_finite(arr, fail, mod)
            if mod == "depth" and (arr < 0).any():
                raise fail(f"{int((arr < 0).sum())} negative depth values")
            return arr
        if ext in ("png", "jpg", "jpeg"):
            modes = {"rgb": _RGB_MODES, "normals": _RGB_MODES, "semseg": _LABEL_MODES}.get(mod, _WIDE_MODES)
            arr = self._load_image(path, modes, (h, w), fail)
            if mod == "rgb":
                return arr
            if mod == "normals":
                return arr if raw else decode_normals(arr)
            if mod == "semseg":
                if self.classes and arr.max(initial=0) >= len(self.classes):
                    raise fail(f"class id {int(arr.max())} >= number of classes {len(self.classes)} "
                               "in dataset.json")
                return arr.astype(np.uint8)
            if mod == "instance":
                if arr.min(initial=0) < 0:
                    raise fail("negative instance ids")
                return arr.astype(np.int32)
            # depth as a 16-bit PNG
            if arr.dtype != np.uint16 and arr.dtype != np.uint8:
                raise fail(f"wrong dtype: a depth PNG must be 16-bit, got {arr.dtype}")
            return decode_depth_png16(arr, self.depth_scale)
        if mod == "caption":
            data = _read_bytes(path, stem, mod)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(f"text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            return text[:-1] if text.endswith("\n") else text
        obj = _load_json_file(path, "JSON file", stem, mod)
        if mod == "metadata":
            if not isinstance(obj, dict):
                raise fail(f"expected a JSON object, got {type(obj).__name__}")
            return obj
        return self._check_boxes(obj, fail)

    def _check_boxes(self, boxes, fail):
        h, w = self.resolution
        if not isinstance(boxes, list):
            raise fail(f"expected a JSON list of boxes, got {type(boxes).__name__}")
        for j, b in enumerate(boxes):
            if not isinstance(b, dict) or not isinstance(b.get("class"), str):
                raise fail(f"box {j}: expected an object with a string 'class', got {b!r}")
            box = b.get("box")
            numbers = isinstance(box, list) and all(isinstance(v, (int, float)) for v in box)
            if not (numbers and len(box) == 4):
                raise fail(f"box {j}: 'box' must be [x0, y0, x1, y1] numbers, got {box!r}")
            x0, y0, x1, y1 = box
            if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
                raise fail(f"box {j}: {box} is not inside the {w}x{h} image with x0 <= x1, y0 <= y1")
        return boxes

    @staticmethod
    def _load_npy(path, fail) -> np.ndarray:
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise fail(f"unreadable .npy file: {e}") from None

    @staticmethod
    def _check_finite(arr, fail, mod):
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise fail(f"{int(bad.sum())} NaN/inf values in {mod} (first at {idx})")

    @staticmethod
    def _load_image(path, modes, size, fail) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.load()
                    mode, (w, h) = img.mode, img.size
                    if mode not in modes:
                        allowed = " or ".join(f"{m} ({d})" for m, d in modes.items())
                        raise fail(f"wrong channels/dtype: expected {allowed} "
                                   f"image, got mode {mode!r}")
                    arr = np.array(img)
        except FolderError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:
            raise fail(f"unreadable image: {e}") from None
        if (h, w) != size:
            raise fail(f"wrong size: expected {size[0]}x{size[1]} (HxW), got {h}x{w}")
        return arr

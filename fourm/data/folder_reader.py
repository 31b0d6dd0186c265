"""Reading and validating aligned folders (import `AlignedFolder` from `fourm.data.folder`).

Which subfolders a folder may have, and how each file decodes, comes from the registry's fields
(`fourm.modalities`, decoded by `fourm.data.fields`): a registered field is read like a built-in one.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from fourm import modalities as registry
from fourm.data import fields
from fourm.data.fields import FORMAT_NAME, INTRINSIC_KEYS, FolderError
from fourm.io import PathEscapeError, atomic_write, inside


def _load_json_file(path: Path, what: str, sample=None, modality=None):
    raw = _read_bytes(path, sample, modality)
    return fields.load_json(raw, what, lambda p: FolderError(p, sample=sample, modality=modality, path=path))


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
        self.modalities = [m for m in registry.field_names() if m in self.exts]
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
        exts = fields.extensions()
        for m, ext in mods.items():
            if m not in exts:
                raise bad(f"unknown modality {m!r}; known: {list(exts)} (register a field for it in "
                          f"a module named by the config field `modules`; see the README, 'Your own "
                          f"modality')")
            if ext not in exts[m]:
                raise bad(f"modality {m!r} has extension {ext!r}; allowed: {list(exts[m])}")
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
        atomic_write(path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
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

        return fields.decode_value(registry.field(mod), _read_bytes(path, stem, mod), ext,
                                   resolution=self.resolution, fail=fail, raw=raw,
                                   depth_scale=self.depth_scale, classes=self.classes)

"""`fourm-scenes`: procedural multimodal scenes, the aligned-folder viewer and TFDS builds.

    fourm-scenes --num 1000 --resolution 64 --seed 0 --out data/scenes_64 [--workers 2]
    fourm-scenes show data/scenes_64 --num 8 --out grid.png [--skip-bad]
    fourm-scenes validate DIR [--report bad.json]          # exit status 1 if any sample is bad
    fourm-scenes tfds DIR --data_dir data/tfds [--name my_data] [--skip-bad]   # folder -> TFDS
    fourm-scenes tfds --num 1000 --num_val 100 --data_dir data/tfds           # generator -> TFDS

Every setting is a field of configs/scenes.py (`--config scenes:224`, `--config.num=...`); the
plain flags above are aliases of those fields (listed in configs/scenes.py) and win over them.
Flags may be spelled with dashes or underscores (--skip-bad = --skip_bad).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from fourm.config import define_config_flag

_CONFIG = define_config_flag("scenes")
flags.DEFINE_integer("num", None, "scenes to generate (show: rows of the grid); alias of config.num / "
                     "show.num")
flags.DEFINE_integer("resolution", None, "image side in pixels; alias of config.resolution")
flags.DEFINE_integer("seed", None, "dataset seed; alias of config.seed")
flags.DEFINE_integer("start", None, "first scene index; alias of config.start")
flags.DEFINE_string("out", None, "output folder (show: output PNG); alias of config.out / show.out")
flags.DEFINE_integer("workers", None, "worker processes; alias of config.num_workers")
flags.DEFINE_enum("depth_format", None, ["npy", "png16"], "depth files; alias of config.depth_format")
flags.DEFINE_boolean("overwrite", None, "replace earlier output; alias of config.overwrite")
flags.DEFINE_boolean("skip_bad", None, "skip (and list) bad samples when reading a folder; alias of "
                     "config.skip_bad")
flags.DEFINE_string("report", None, "where to write the list of skipped samples; alias of config.report")
flags.DEFINE_string("data_dir", None, "TFDS data_dir; alias of config.tfds.data_dir")
flags.DEFINE_string("name", None, "TFDS dataset name; alias of config.tfds.name")
flags.DEFINE_string("split", None, "TFDS split for a folder; alias of config.tfds.split")
flags.DEFINE_integer("num_val", None, "TFDS validation scenes after the train ones; alias of "
                     "config.tfds.num_val")
FLAGS = flags.FLAGS

COMMANDS = ("generate", "show", "validate", "tfds")


def _resolved_config(command: str):
    """The config with plain flags applied on top (a plain flag given wins)."""
    c = _CONFIG.value
    default_out = c.out == f"data/scenes_{c.resolution}"
    aliases = {"resolution": "resolution", "seed": "seed", "start": "start", "workers": "num_workers",
               "depth_format": "depth_format", "overwrite": "overwrite", "skip_bad": "skip_bad",
               "report": "report", "data_dir": "tfds.data_dir", "name": "tfds.name", "split": "tfds.split",
               "num_val": "tfds.num_val"}
    aliases["num"] = "show.num" if command == "show" else "num"
    aliases["out"] = "show.out" if command == "show" else "out"
    for flag, field in aliases.items():
        value = FLAGS[flag].value
        if value is not None:
            *parents, leaf = field.split(".")
            node = c
            for p in parents:
                node = node[p]
            node[leaf] = value
    if default_out and FLAGS["out"].value is None:  # the default folder follows the resolution
        c.out = f"data/scenes_{c.resolution}"
    return c


def _scene_config(c):
    from fourm.data.scenes import SceneConfig

    return SceneConfig(fov_deg=c.fov_deg, min_objects=c.min_objects, max_objects=c.max_objects,
                       shadows=c.shadows)


def _open_folder(path: str, c):
    from fourm.data.viewer import open_folder

    return open_folder(path, skip_bad=c.skip_bad, report=c.report or None, progress=True)


def cmd_generate(c) -> None:
    from fourm.data.scenes import export_scenes

    spec = export_scenes(c.out, c.seed, c.start, c.num, c.resolution, workers=c.num_workers,
                         config=_scene_config(c), depth_format=c.depth_format, overwrite=c.overwrite)
    print(f"wrote {c.num} scenes at {c.resolution}px to {spec.parent} ({spec.name} describes them)")


def cmd_show(c, folder_path: str) -> None:
    from fourm.data.viewer import show

    folder = _open_folder(folder_path, c)
    if len(folder) == 0:
        raise app.UsageError(f"{folder_path} has no samples to show")
    show(folder, num=c.show.num, out=c.show.out)


def cmd_validate(c, folder_path: str) -> int:
    from fourm.data.folder import AlignedFolder, FolderError

    try:
        folder = AlignedFolder(folder_path, skip_bad=True, progress=True)
    except FolderError as e:  # dataset.json itself is unusable
        print(f"invalid: {e}")
        return 1
    if c.report or folder.skipped:
        folder.write_report(c.report or Path(folder_path) / "skipped.json")
    print(f"{len(folder)} good samples, {len(folder.skipped)} bad")
    for e in folder.skipped[:20]:
        print(f"  {e}")
    return 1 if folder.skipped else 0


def cmd_tfds(c, folder_path: str | None) -> None:
    from fourm.data import tfds_scenes

    if folder_path:
        folder = _open_folder(folder_path, c)
        builder = tfds_scenes.AlignedFolderBuilder(folder, data_dir=c.tfds.data_dir,
                                                   name=c.tfds.name or "aligned_folder", split=c.tfds.split)
        path = builder.prepare(c.overwrite)
    else:
        path = tfds_scenes.build_from_scenes(c.tfds.data_dir, seed=c.seed, resolution=c.resolution, num=c.num,
                                             num_val=c.tfds.num_val, start=c.start, workers=c.num_workers,
                                             name=c.tfds.name or "fourm_scenes", overwrite=c.overwrite)
    print(f"TFDS dataset (ArrayRecord) at {path}; read it with "
          f"tfds.data_source({path.parent.name!r}, data_dir={str(path.parent.parent)!r})")


def main_with_args(argv) -> int:
    command, rest = "generate", list(argv[1:])
    if rest and rest[0] in COMMANDS:
        command, rest = rest[0], rest[1:]
    needs_dir = command in ("show", "validate")
    extra = (needs_dir and len(rest) != 1) or (command == "generate" and rest)
    if extra or (command == "tfds" and len(rest) > 1):
        raise app.UsageError(f"usage: fourm-scenes [{'|'.join(COMMANDS)}] [DIR] [flags]; got {argv[1:]}")
    c = _resolved_config(command)
    if command == "generate":
        cmd_generate(c)
    elif command == "show":
        cmd_show(c, rest[0])
    elif command == "validate":
        return cmd_validate(c, rest[0])
    else:
        cmd_tfds(c, rest[0] if rest else None)
    return 0


def _parse_flags(argv):
    """absl parsing after turning --long-flag-name into --long_flag_name (not --config.* values)."""
    fixed = [argv[0]]
    for a in argv[1:]:
        if a.startswith("--") and not a.startswith("--config"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        fixed.append(a)
    try:
        return FLAGS(fixed)
    except flags.Error as e:
        print(f"{e}\nPass --help for usage.", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:  # absl exits with status 1 after printing --help; asking is not an error
        if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in fixed[1:]):
            sys.exit(0)
        raise


def _main(argv):
    sys.exit(main_with_args(argv))


def main():
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()

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

from pathlib import Path

from absl import app, flags

from fourm.cli import CommandError, entry, positive
from fourm.config import define_config_flag


def define_flags(fv, argv):
    define_config_flag("scenes", fv, argv)
    d = dict(flag_values=fv)
    flags.DEFINE_integer("num", None, "scenes to generate (show: rows of the grid); alias of config.num "
                         "/ show.num", **d)
    flags.DEFINE_integer("resolution", None, "image side in pixels; alias of config.resolution", **d)
    flags.DEFINE_integer("seed", None, "dataset seed; alias of config.seed", **d)
    flags.DEFINE_integer("start", None, "first scene index; alias of config.start", **d)
    flags.DEFINE_string("out", None, "output folder (show: output PNG); alias of config.out / show.out", **d)
    flags.DEFINE_integer("workers", None, "worker processes; alias of config.num_workers", **d)
    flags.DEFINE_enum("depth_format", None, ["npy", "png16"], "depth files; alias of "
                      "config.depth_format", **d)
    flags.DEFINE_boolean("overwrite", None, "replace earlier output; alias of config.overwrite", **d)
    flags.DEFINE_boolean("skip_bad", None, "skip (and list) bad samples when reading a folder; alias of "
                         "config.skip_bad", **d)
    flags.DEFINE_string("report", None, "where to write the list of skipped samples; alias of "
                        "config.report", **d)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir; alias of config.tfds.data_dir", **d)
    flags.DEFINE_string("name", None, "TFDS dataset name; alias of config.tfds.name", **d)
    flags.DEFINE_string("split", None, "TFDS split for a folder; alias of config.tfds.split", **d)
    flags.DEFINE_integer("num_val", None, "TFDS validation scenes after the train ones; alias of "
                         "config.tfds.num_val", **d)


COMMANDS = ("generate", "show", "validate", "tfds")


def _resolved_config(command: str, F):
    """The config with plain flags applied on top (a plain flag given wins), checked."""
    c = F.config
    default_out = c.out == f"data/scenes_{c.resolution}"
    aliases = {"resolution": "resolution", "seed": "seed", "start": "start", "workers": "num_workers",
               "depth_format": "depth_format", "overwrite": "overwrite", "skip_bad": "skip_bad",
               "report": "report", "data_dir": "tfds.data_dir", "name": "tfds.name", "split": "tfds.split",
               "num_val": "tfds.num_val"}
    aliases["num"] = "show.num" if command == "show" else "num"
    aliases["out"] = "show.out" if command == "show" else "out"
    for flag, field in aliases.items():
        value = F[flag].value
        if value is not None:
            *parents, leaf = field.split(".")
            node = c
            for p in parents:
                node = node[p]
            node[leaf] = value
    if default_out and F["out"].value is None:  # the default folder follows the resolution
        c.out = f"data/scenes_{c.resolution}"
    check_config(c, command)
    return c


def check_config(c, command: str) -> None:
    """Counts and sizes a command uses, before it writes anything."""
    num_flag = "--num (config.show.num)" if command == "show" else "--num (config.num)"
    positive(num_flag, int(c.show.num if command == "show" else c.num))
    positive("--resolution (config.resolution)", int(c.resolution))
    positive("--start (config.start)", int(c.start), allow_zero=True)
    positive("--workers (config.num_workers)", int(c.num_workers), allow_zero=True)
    positive("--num_val (config.tfds.num_val)", int(c.tfds.num_val), allow_zero=True)


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


def run(argv, F) -> int:
    command, rest = "generate", list(argv[1:])
    if rest and rest[0] in COMMANDS:
        command, rest = rest[0], rest[1:]
    needs_dir = command in ("show", "validate")
    extra = (needs_dir and len(rest) != 1) or (command == "generate" and rest)
    if extra or (command == "tfds" and len(rest) > 1):
        raise app.UsageError(f"usage: fourm-scenes [{'|'.join(COMMANDS)}] [DIR] [flags]; got {argv[1:]}")
    if needs_dir and not Path(rest[0]).is_dir():
        raise CommandError(f"{command} {rest[0]}: no such folder (expected an aligned folder with "
                           "dataset.json)")
    c = _resolved_config(command, F)
    if command == "generate":
        cmd_generate(c)
    elif command == "show":
        cmd_show(c, rest[0])
    elif command == "validate":
        return cmd_validate(c, rest[0])
    else:
        cmd_tfds(c, rest[0] if rest else None)
    return 0


main = entry(__name__)


if __name__ == "__main__":
    main()

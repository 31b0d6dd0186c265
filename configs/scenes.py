"""`fourm-scenes`: procedural scenes -> aligned folder, viewer grid, TFDS.

Variants: `--config scenes` (64 px), `--config scenes:224` (224 px into data/scenes_224).
Plain flags of the command are aliases of fields here: --num (num, or show.num for `show`),
--resolution, --seed, --start, --out (out, or show.out for `show`), --workers (num_workers),
--depth_format, --overwrite, --skip_bad, --report, --data_dir (tfds.data_dir), --name
(tfds.name), --split (tfds.split), --num_val (tfds.num_val).
"""

from fourm.config import common_config


def get_config(arg=None):
    c = common_config()  # seed, resolution (64), num_workers, ...
    if arg:
        c.resolution = int(arg)
    c.num = 1000  # scenes to generate
    c.start = 0  # first scene index (scene i is a pure function of (seed, i))
    c.out = f"data/scenes_{c.resolution}"
    c.depth_format = "npy"  # or "png16" (millimetres in a 16-bit PNG)
    c.overwrite = False  # replace a folder fourm-scenes wrote before
    # Scene sampling.
    c.fov_deg = 55.0
    c.min_objects = 1
    c.max_objects = 6
    c.shadows = True
    # Reading folders (show / tfds / validate): skip bad samples instead of failing, and where to
    # write the list of skipped samples ("" = <folder>/skipped.json when any were skipped).
    c.skip_bad = False
    c.report = ""
    c.show = dict(num=8, out="scenes_grid.png")
    c.tfds = dict(data_dir="data/tfds", name="", split="train", num_val=0)
    return c

"""The aligned-folder viewer: one PNG, a row per sample, a column per modality, caption below.

    from fourm.data.viewer import show
    show("data/scenes_64", num=8, out="grid.png")      # = fourm-scenes show data/scenes_64
"""

from __future__ import annotations

import os
from pathlib import Path

from fourm.data import visualize
from fourm.data.folder import AlignedFolder


def open_folder(path: str | os.PathLike, skip_bad: bool = False, report: str | os.PathLike | None = None,
                progress: bool = False) -> AlignedFolder:
    """Open an aligned folder; with skip_bad, bad samples are dropped and listed in `report`
    (default <folder>/skipped.json, written only when something was skipped)."""
    folder = AlignedFolder(path, skip_bad=skip_bad, progress=progress)
    if folder.skipped:
        report = Path(report or Path(path) / "skipped.json")
        folder.write_report(report)
        print(f"skipped {len(folder.skipped)} bad samples of {len(folder.skipped) + len(folder)} "
              f"(list: {report}); first: {folder.skipped[0]}")
    return folder


def grid_for(folder: AlignedFolder, num: int = 8, cell: int = 128):
    """The viewer picture of the first `num` samples, and its column titles."""
    n = min(num, len(folder))
    if n == 0:
        raise ValueError(f"{folder.root} has no samples to show")
    scale = max(1, -(-cell // folder.resolution[0]))  # boxes are drawn on the upscaled RGB
    rows, captions, titles = [], [], []
    for i in range(n):
        sample = folder[i]
        pics, titles = visualize.sample_row(sample, scale=scale)
        rows.append(pics)
        captions.append(f"{folder.stems[i]}: {sample.get('caption', '')}")
    return visualize.make_grid(rows, captions=captions, col_titles=titles), titles


def show(folder: str | os.PathLike | AlignedFolder, num: int = 8, out: str | os.PathLike = "grid.png",
         skip_bad: bool = False, report: str | os.PathLike | None = None) -> Path:
    """Write the viewer grid of an aligned folder to `out` (PNG); returns its path."""
    if not isinstance(folder, AlignedFolder):
        folder = open_folder(folder, skip_bad=skip_bad, report=report)
    grid, titles = grid_for(folder, num)
    visualize.save_png(out, grid)
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]} px, {min(num, len(folder))} samples, "
          f"columns: {', '.join(titles)})")
    return Path(out)

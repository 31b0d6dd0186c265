"""fourm.bench.specialists on tiny data: each model learns (beats its untrained self on held-out
scenes, scored by the shared metrics), and the CLI refuses bad input without writing anything."""

import json

import numpy as np
import pytest

from fourm.bench import specialists as sp
from fourm.data import scenes


@pytest.fixture(scope="module")
def data():
    train = list(scenes.generate_scenes(0, 0, 48, resolution=32, progress=False))
    held = list(scenes.generate_scenes(0, 1_000_000, 16, resolution=32, progress=False))
    return train, held


@pytest.mark.parametrize("task,metric,better", [("semseg", "pixel_acc", 1), ("depth", "abs_rel", -1),
                                                 ("caption", "count_acc", 0)])
def test_specialist_learns(data, task, metric, better):
    train, held = data
    rgb, y = np.stack([s["rgb"] for s in train]), sp.targets(task, train)
    held_rgb = np.stack([s["rgb"] for s in held])
    figs = {}
    for steps in (0, 60 if better else 10):
        model, done = sp.train_specialist(task, rgb, y, minutes=5, max_steps=steps, width=8, batch=16,
                                          lr=3e-3, log=lambda *_: None)
        assert done == steps
        figs[steps] = sp.score(task, sp.predict(task, model, held_rgb), held)
    assert np.isfinite(figs[steps][metric])
    if better:  # the dense tasks improve measurably in 60 steps; captions only need to run
        assert better * (figs[steps][metric] - figs[0][metric]) > 0, figs


def test_cli_errors_write_nothing(tmp_path, capsys):
    assert sp.main(["--data", str(tmp_path), "--minutes", "1"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"seed": 0}))
    assert sp.main(["--data", str(tmp_path), "--minutes", "1"]) == 2
    assert "lacks ['resolution'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sp.main(["--data", str(tmp_path), "--minutes", "1", "--tasks", "depth,colour"])
    assert "--tasks: unknown ['colour']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sp.main(["--data", str(tmp_path), "--minutes", "0"])
    assert not (tmp_path / "specialists.json").exists()

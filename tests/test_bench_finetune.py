"""fourm.bench.finetune at tiny size: every figure is produced and finite (the lead measures)."""

import json

import numpy as np
import pytest

from fourm.bench import finetune


@pytest.mark.slow  # three trainer runs and four probe fits (~1-4 min on 2 cores)
def test_finetune_and_backbone_benchmark_runs_tiny(tmp_path):
    f = finetune.default_config(quick=True)
    fig = finetune.run(f, tmp_path)
    ft, bb = fig["finetune"], fig["backbone"]
    for k in ("pretrained", "scratch"):
        assert ft[k]["step"] == f.finetune_steps and np.isfinite(ft[k]["loss"]) and 0 <= ft[k]["accuracy"] <= 1
    # the fine-tune run really started from the pretrained export, with the normals' parameters new
    init = json.loads((tmp_path / "normals_pretrained" / "init.json").read_text())
    assert init["source"].endswith("pretrain/export") and init["loaded"]
    assert init["new"] and all(finetune.NEW in n for n in init["new"])
    assert not (tmp_path / "normals_scratch" / "init.json").exists()
    assert set(bb) == {"probe_pretrained", "finetune_pretrained", "probe_random", "finetune_random"}
    assert all(np.isfinite(v["loss"]) and 0 <= v["accuracy"] <= 1 for v in bb.values())
    text = finetune.format_figures(fig)
    assert "tok_normal@64" in text and "probe_pretrained" in text

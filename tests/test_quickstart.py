"""The quickstart's smoke profile end to end: every stage runs, the report is written, a second run
skips every stage (the cache), and the notebooks in notebooks/ run top to bottom on its artifacts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fourm.config import REPO_ROOT
from fourm.quickstart import STAGES

NOTEBOOKS = {  # notebook -> the least number of pictures (image/png outputs) it must show
    "tokenizers.ipynb": 8,  # input | tokens | reconstruction and a usage histogram per image tokenizer
    "generation.ipynb": 3,  # rgb -> depth -> normals -> caption, caption -> rgb, guidance sweep
}


def _execute_notebook(path: Path, env: dict) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel ("python3", i.e. this interpreter); a cell error raises
    nbclient's CellExecutionError with the cell's traceback."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute(env=env)
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.slow
def test_quickstart_smoke_runs_and_caches(tmp_path):
    work = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "fourm.cli.quickstart", "--config", "quickstart:smoke",
           f"--config.workdir={work}"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "(2 devices)" in first.stdout + first.stderr  # the smoke profile's config.num_devices
    for name, _ in STAGES:
        done = json.loads((work / name / "DONE.json").read_text())
        assert done["wall_s"] >= 0
    report = (work / "report.html").read_text()
    for picture in ("scenes/grid.png", "generate/rgb_to_all.png", "generate/caption_to_rgb.png",
                    "report/loss.png"):
        assert picture in report
        assert (work / picture).stat().st_size > 1000
    for figure in ("psnr", "abs_rel", "angle_mean_deg", "pixel_acc", "codebook_usage_pct", "depth_rmse"):
        assert figure in report, figure  # every tokenizer's own figures, and generation's
    # quality.json: the schema; every RGB -> X figure measured (specialists: not in this run).
    from fourm.quality import table

    quality = json.loads((work / "quality.json").read_text())
    table.check_schema(quality)
    for task in ("rgb->depth", "rgb->normals", "rgb->semseg", "rgb->caption"):
        row = quality["tasks"][task]
        assert row["fourm"] is not None and row["tokenizer_ceiling"] is not None, (task, row)
        assert row["mean_baseline"] is not None and row["specialist"] is None, (task, row)
    assert 0 <= quality["tasks"]["caption->rgb"]["checker_accuracy_on_true_images"] <= 1
    assert quality["minutes"]["pretrain"] > 0
    assert "Quality: the model beside single-task specialists" in report and "rgb-&gt;semseg" in report
    # The model learned something in its few steps: the loss fell.
    metrics = [json.loads(l) for l in (work / "pretrain" / "metrics.jsonl").read_text().splitlines() if l]
    losses = [m["loss"] for m in metrics if m.get("split") == "train" and "loss" in m]
    assert losses and losses[-1] < losses[0]

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("cached") == len(STAGES), second.stdout

    # The notebooks, on these artifacts (rather than a second smoke run of their own).
    from jupyter_client.kernelspec import KernelSpecManager

    kernel_cmd = KernelSpecManager().get_kernel_spec("python3").argv[0]
    # jupyter_client runs a spec saying "python" with the interpreter that starts it: this one.
    assert kernel_cmd in ("python", "python3", sys.executable), kernel_cmd
    for name, min_pictures in NOTEBOOKS.items():
        nb = _execute_notebook(REPO_ROOT / "notebooks" / name, dict(env, FOURM_QUICKSTART_DIR=str(work)))
        outputs = _outputs(nb)
        errors = [o for o in outputs if o.output_type == "error"]
        assert not errors, [f"{name}: {e.ename}: {e.evalue}" for e in errors]
        pictures = sum("image/png" in o.get("data", {}) for o in outputs)
        assert pictures >= min_pictures, f"{name}: {pictures} pictures, expected >= {min_pictures}"

    # Time to first result (fourm.bench.startup) on these artifacts: the three user commands run
    # as fresh processes, cold then warm, and are compared with the in-process work.
    from fourm.bench import startup

    results = {r.name: r for r in startup.run(work, rounds=1, log=lambda *a, **k: None)}
    assert set(results) == {f"startup.{n}.warm" for n in ("generate", "train", "tokenizer")}
    for r in results.values():
        assert r.seconds > 0 and r.first_s > 0 and r.extra["steady_s"] > 0, r
    train = results["startup.train.warm"].extra  # its first step, timed from the live log
    assert 0 < train["first_step_warm_s"][0] < train["warm_s"][0], train


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebooks_are_stored_without_outputs(name):
    path = REPO_ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path}: no code cells"
    stale = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not stale, (f"{path}: code cells {stale} carry outputs; clear them before committing "
                       f"(see notebooks/README.md)")


def test_workdir_remembers_its_config_and_refuses_another(tmp_path):
    from fourm.config import load_config
    from fourm.quickstart import WorkdirMismatchError, write_config

    smoke = load_config("quickstart:smoke", [f"workdir={tmp_path}"])
    write_config(smoke)
    assert json.loads((tmp_path / "config.json").read_text())["profile"] == "smoke"
    write_config(smoke)  # the same config again: fine (a resumed or cached run)
    default = load_config("quickstart", [f"workdir={tmp_path}"])
    with pytest.raises(WorkdirMismatchError, match=r"config.json.*profile: 'smoke' -> 'default'"):
        write_config(default)


def test_device_count_is_read_from_the_command_line_before_jax_starts():
    from fourm.cli.quickstart import _devices_from_argv

    assert _devices_from_argv([]) == 1  # the default profile: the real device count
    assert _devices_from_argv(["--config", "quickstart:smoke"]) == 2
    assert _devices_from_argv(["--config=quickstart:smoke", "--config.num_devices=8"]) == 8
    assert _devices_from_argv(["--config.num_devices", "4"]) == 4
    assert _devices_from_argv(["--config", "nosuchconfig"]) == 1  # the real parse reports it

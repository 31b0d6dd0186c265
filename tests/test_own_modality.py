"""A user's own modality, registered from outside the package, end to end through the commands:
folder -> validate -> TFDS -> tokenizer -> shards (augmented) -> train -> generate.

The modality is `edges`, a 1-channel image computed from the scenes' segmentation and depth (the
scenes have no such field), tokenized by a VQ tokenizer that `fourm-train-tokenizer` trains. Its
registration lives in `my_mods.py`, written to the test's folder and named by the config field
`modules` of every command; nothing in fourm is edited. Tiny and fast: 32 px, 4x4 tokens, a few
steps (the commands run as subprocesses, on one CPU device).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fourm.data.scenes import export_scenes

REPO = Path(__file__).resolve().parents[1]

MY_MODS = '''"""edges: a 1-channel image field and its VQ tokens at 32 px (a user's module)."""
from fourm import modalities as m

m.register_field(m.Field("edges", "image", ("png",), channels=1))
m.register(m.Modality("rgb@32", "pixels", grid=(4, 4), patch_size=8, channels=3,
                      tokenizer="patches", source="rgb"))
m.register(m.Modality("tok_edges@32", "grid", 64, (4, 4), tokenizer="vq:edges", source="edges"))
'''

TOKENIZER_CONFIG = '''from fourm.tokenizers.recipes import base_config


def get_config(arg=None):
    c = base_config("edges", "tok_edges", dict(kind="image", channels=1), arg or "32,tiny")
    c.modules = ("my_mods.py",)
    c.data.update(source="folder", folder="folder", train_start=0, train_num=16,
                  eval_start=16, eval_num=8)
    c.workdir = "tokenizers/tok_edges"
    return c
'''

def edges_of(semseg: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """255 where the class changes or depth jumps by more than 0.25 m to the next pixel."""
    e = np.zeros(semseg.shape, bool)
    for axis in (0, 1):
        jump = (np.diff(semseg.astype(int), axis=axis) != 0) | (np.abs(np.diff(depth, axis=axis)) > 0.25)
        if axis == 0:
            e[1:] |= jump
        else:
            e[:, 1:] |= jump
    return (e * 255).astype(np.uint8)


def make_folder(root: Path, num: int = 24) -> None:
    spec_path = export_scenes(root, 0, 0, num, 32, progress=False)
    (root / "edges").mkdir()
    for p in sorted((root / "semseg").glob("*.png")):
        edges = edges_of(np.asarray(Image.open(p)), np.load(root / "depth" / f"{p.stem}.npy"))
        Image.fromarray(edges).save(root / "edges" / p.name)
    spec = json.loads(spec_path.read_text())
    spec["modalities"]["edges"] = "png"
    spec_path.write_text(json.dumps(spec))


def run(cwd: Path, module: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    if ok:
        assert p.returncode == 0, f"{module} {args}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.mark.slow
def test_registered_modality_end_to_end(tmp_path):
    (tmp_path / "my_mods.py").write_text(MY_MODS)
    (tmp_path / "edges_tokenizer.py").write_text(TOKENIZER_CONFIG)
    make_folder(tmp_path / "folder")
    mods = "--config.modules=my_mods.py"

    # Without the registration the folder is refused, naming the modality; with it, it validates.
    p = run(tmp_path, "fourm.cli.scenes", "validate", "folder", ok=False)
    assert p.returncode == 1 and "unknown modality 'edges'" in p.stdout
    p = run(tmp_path, "fourm.cli.scenes", "validate", "folder", mods)
    assert "24 good samples, 0 bad" in p.stdout
    run(tmp_path, "fourm.cli.scenes", "tfds", "folder", "--data_dir", "tfds", mods)

    run(tmp_path, "fourm.cli.train_tokenizer", "--config", "edges_tokenizer.py")
    tok = json.loads((tmp_path / "tokenizers/tok_edges/tokenizer.json").read_text())
    assert tok["tokenizer_config"]["modality"] == "edges"

    # The registered name works as a config key (the modules are imported before keys are
    # checked); worker processes import them too; crops and flips are applied to every field.
    run(tmp_path, "fourm.cli.pretokenize", "--config", "pretokenize:text", mods,
        "--config.source.kind=tfds", "--config.source.tfds_dir=tfds/aligned_folder/1.0.0",
        "--config.source.resolution=32", "--config.modalities=('rgb@32','tok_edges@32')",
        "--config.image_tokenizers.tok_edges@32=tokenizers/tok_edges", "--config.out_dir=shards",
        "--config.shard_size=16", "--config.batch_size=8", "--config.workers=2",
        "--config.augment.enabled=true")
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["num_records"] == 24 and manifest["modalities"]["tok_edges@32"]["shape"] == [4, 4]
    assert manifest["modalities"]["tok_edges@32"]["tokenizer"]["name"] == "tok_edges@32"
    assert manifest["augment"] == {"seed": 0, "hflip": 0.5, "crop": [0.8, 1.0], "flip_text": True}

    # One sample per row of 8 target tokens; head_chunk=32 keeps the loss head's chunk within the
    # 64 target rows of a batch (see fourm.model.heads).
    run(tmp_path, "fourm.cli.train", "--config", "pretrain:smoke", mods, "--config.data.dir=shards",
        "--workdir", "run", "--config.model.modalities=('rgb@32','tok_edges@32')",
        "--config.masking.input_budget=8", "--config.masking.target_budget=8",
        "--config.batch_size=8", "--config.model.head_chunk=32", "--config.num_train_steps=3",
        "--config.eval_every=0", "--config.ckpt_every=3", "--config.log_every=1")
    exported = json.loads((tmp_path / "run/export/config.json").read_text())
    assert [m["name"] for m in exported["modalities"]] == ["rgb@32", "tok_edges@32"]

    Image.open(tmp_path / "folder/rgb/000020.png").save(tmp_path / "photo.png")
    p = run(tmp_path, "fourm.cli.generate", mods, "--checkpoint", "run/export", "--tokenizers",
            "tokenizers", "--cond", "rgb=photo.png", "--targets", "edges:steps=2", "--out", "gen")
    with np.load(tmp_path / "gen/tokens.npz", allow_pickle=False) as z:
        ids = z["tok_edges@32"]
    assert ids.shape == (1, 4, 4) and 0 <= ids.min() and ids.max() < 64
    pic = np.asarray(Image.open(tmp_path / "gen/000_tok_edges_32.png"))
    assert pic.shape[:2] == (32, 32)

    # A registered modality whose file does not decode: the file and the reason.
    (tmp_path / "folder/edges/000003.png").write_bytes(b"not a png")
    p = run(tmp_path, "fourm.cli.scenes", "validate", "folder", mods, ok=False)
    assert p.returncode == 1 and "23 good samples, 1 bad" in p.stdout
    assert "edges/000003.png" in p.stdout and "unreadable image" in p.stdout

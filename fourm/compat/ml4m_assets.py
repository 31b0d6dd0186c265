"""Released 4M assets around a 4M model: tokenizer folders per modality, 4M's image
preprocessing, and its recommended sampler settings as named presets.

    toks = load_tokenizers("tokenizers/", model.spec, ["tok_depth@224", "caption"])
    image = read_image("photo.jpg", 224)            # uint8 [224, 224, 3], 4M's center crop + resize
    Target(**preset_settings("rgb2x", model.spec.modality("tok_depth@224")))

Which folder serves which modality (a folder = `config.json` + `model.safetensors`, as the
`EPFL-VILAB/4M_tokenizers_*` releases are laid out):
  1. `TOK_DIR/tokenizers.json`, if present: {"<modality>": "<folder inside TOK_DIR>", ...}; keys are
     the model's names (`tok_depth@224`) or their stems (`depth`, `dinov2_global`); "text" names
     the WordPiece JSON. Paths must stay inside TOK_DIR.
  2. otherwise by 4M's hub name: `4M_tokenizers_<stem>_<vocab>_...`, anywhere in the folder name
     (so `models--EPFL-VILAB--4M_tokenizers_rgb_16k_224-448` works too); the stems are `HUB_STEMS`.
  3. the text tokenizer: the one `text_tokenizer*.json` in TOK_DIR (4M's
     `text_tokenizer_4m_wordpiece_30k.json`).

Array conventions (4M's `modality_transforms` and `plotting_utils`), per modality stem:
  rgb      native float [0, 1] / uint8 HWC; the tokenizer takes x*2-1, or ImageNet-standardised
           pixels when its config says undo_std; decoded (x+1)/2
  depth    native float HW (any unit); standardised per image with 4M's truncated statistics
           (10% cut at both ends); decoded is that standardised depth (shown min-max normalised)
  normal   native float HWC in [-1, 1] (or uint8 (n+1)*127.5); decoded in [-1, 1]
  semseg   native int HW class ids; decoded = argmax of the class logits
  edges    decoded single-channel maps in [-1, 1] (shown grey)
  others   (CLIP / DINOv2 / ImageBind feature maps, globals): decoded feature arrays (B, C, h, w),
           shown by their first 3 principal components (globals: written as arrays); they cannot
           be made from an image here (that needs those networks), only decoded
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from fourm.batch import IMAGENET_MEAN, IMAGENET_STD
from fourm.compat import ml4m_text
from fourm.compat.ml4m_tokenizers.artifact import io_shapes
from fourm.compat.ml4m_tokenizers.config import TokenizerConfigError
from fourm.compat.ml4m_tokenizers.load import CONFIG_FILE, WEIGHTS_FILE, Tokenizer
from fourm.compat.ml4m_tokenizers.load import load as load_folder
from fourm.data import visualize as vis
from fourm.io import read_json_object

MAP_FILE = "tokenizers.json"
TEXT_GLOB = "text_tokenizer*.json"
# 4M hub folder stem -> the modality stems it serves (one edge tokenizer serves both edge kinds).
HUB_STEMS = {"rgb": ("rgb",), "depth": ("depth",), "normal": ("normal",), "semseg": ("semseg",),
             "edge": ("canny_edge", "sam_edge"), "CLIP-B16": ("clip",), "DINOv2-B14": ("dinov2",),
             "DINOv2-B14-global": ("dinov2_global",), "ImageBind-H14": ("imagebind",),
             "ImageBind-H14-global": ("imagebind_global",), "sam-instance": ("sam_instance",),
             "human-poses": ("human_poses",)}
_HUB_RE = re.compile(r"4M_tokenizers_(?P<stem>.+?)_(?P<vocab>\d+k)(?:_|$)")
DIFFUSION_STEPS = 50  # 4M's demo decodes DiVAE tokens with 50 steps (decode_dict decoding_steps)


class AssetError(ValueError):
    """A 4M asset (tokenizer folder, map file, image) that cannot be used; names the file."""


def stem(name: str) -> str:
    """`tok_depth@224` -> `depth`, `tok_dinov2_global` -> `dinov2_global`, `rgb@224` -> `rgb`."""
    s = name.split("@")[0]
    return s[4:] if s.startswith("tok_") else s


# ---------------------------------------------------------------------------------------------
# presets: 4M's recommended sampler settings (ml-4m fourm/demo_4M_sampler.py)
# ---------------------------------------------------------------------------------------------
_ROAR1 = dict(scheme="roar", steps=1, token_schedule="linear", temperature=0.01,
              temperature_schedule="constant", guidance_scale=2.0)
_TEXT = dict(temperature=0.3, temperature_schedule="constant", guidance_scale=1.0)
_TEXT_LOW = dict(temperature=0.1, temperature_schedule="constant", guidance_scale=1.0)  # poses, palette, metadata
_TEXT_SAM = dict(_TEXT_LOW, temperature=0.01)
_ROAR_ONEX = dict(scheme="roar", token_schedule="linear", temperature=3.0,
                  temperature_schedule="onex:0.5:0.5", guidance_scale=2.0)
# Demo4MSampler.forward samples with top_p=0.8, top_k=0 for every target.
_COMMON = dict(top_p=0.8, top_k=0)
PRESETS: dict[str, dict[str, dict]] = {
    # RGB (pixels or tokens) given: DEFAULTS_RGB2X
    "rgb2x": {"grid": _ROAR1, "caption": _TEXT, "det": _TEXT, "sam_instance": _TEXT_SAM,
              "sequence": _TEXT_LOW},
    # RGB generated from other modalities: DEFAULTS_X2RGB
    "x2rgb": {"rgb": dict(_ROAR_ONEX, steps=25),
              "clip": dict(_ROAR_ONEX, steps=50, temperature=5.0, guidance_scale=3.0),
              "dinov2": dict(_ROAR1, steps=8), "imagebind": dict(_ROAR1, steps=8),
              "grid": dict(_ROAR_ONEX, steps=8), "caption": _TEXT, "det": _TEXT, "sam_instance": _TEXT_SAM,
              "sequence": _TEXT_LOW},
    # MaskGIT, cosine schedule, 8 steps (4M's super-resolution setting, DEFAULTS_SR)
    "maskgit8": {"grid": dict(scheme="maskgit", steps=8, token_schedule="cosine", temperature=1.0,
                              temperature_schedule="constant", guidance_scale=2.0),
                 "caption": _TEXT, "det": _TEXT, "sam_instance": _TEXT_SAM, "sequence": _TEXT_LOW},
}


def preset_settings(preset: str, mod) -> dict:
    """Target keyword arguments of `preset` for modality `mod` (a `Modality`)."""
    if preset not in PRESETS:
        raise AssetError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    table = PRESETS[preset]
    s = stem(mod.name)
    fallback = "sequence" if mod.kind == "sequence" else "grid"
    return dict(_COMMON, **table.get(s, table[fallback]))


def auto_preset(condition_names: Sequence[str]) -> str:
    """4M's choice: rgb2x when RGB (pixels or tokens) is among the conditions, else x2rgb."""
    return "rgb2x" if any(stem(n) == "rgb" for n in condition_names) else "x2rgb"


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def read_image(path: str | Path, size: int) -> np.ndarray:
    """An RGB image file as 4M's demo prepares it: center crop to a square of the short side,
    resize to size x size (PIL bicubic); uint8 [size, size, 3]."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "PA"):
                img = img.convert("RGBA")
                mode = "RGBA"
            if mode not in ("RGB", "RGBA"):
                raise AssetError(f"{p}: expected an RGB image (3 channels), got PIL mode {mode} "
                                 f"({len(img.getbands())} channel(s))")
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise AssetError(f"{p}: cannot read the image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    w, h = img.size
    side = min(w, h)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))  # torchvision center_crop
    img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img)


def truncated_standardise(depth: np.ndarray, thresh: float = 0.1) -> np.ndarray:
    """4M's DepthTransform.truncated_depth_standardization for one map: mean / unbiased variance
    of the values left after cutting the lowest and highest `thresh` fraction."""
    flat = np.sort(depth.reshape(-1).astype(np.float64))
    kept = flat[int(thresh * flat.size): int((1 - thresh) * flat.size)]
    var = kept.var(ddof=1) if kept.size > 1 else 0.0
    return ((depth - kept.mean()) / np.sqrt(var + 1e-6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# a 4M tokenizer behind fourm.generate's image-tokenizer interface
# ---------------------------------------------------------------------------------------------
class ML4MImageTokenizer:
    """A loaded 4M tokenizer serving one model modality: `encode(native) -> tokens [B, gh, gw]`,
    `decode(tokens) -> native`, `picture(native) -> uint8 RGB` (the interface `Generator` uses;
    `codec` is this object)."""

    kind = "grid"  # fourm.tokenizer_protocol: it serves a token grid; `stem` says which 4M modality

    def __init__(self, mod, tok: Tokenizer, folder: Path, *, diffusion_steps: int = DIFFUSION_STEPS,
                 seed: int = 0):
        self.mod, self.tok, self.folder = mod, tok, Path(folder)
        self.name, self.stem = mod.name, stem(mod.name)
        self.grid, self.vocab_size = tuple(mod.grid), int(tok.vocab_size)
        self.diffusion_steps, self.seed = int(diffusion_steps), int(seed)
        self.codec = self
        c = tok.cfg
        if self.vocab_size != mod.vocab_size:
            raise AssetError(f"{folder}: tokenizer vocabulary {self.vocab_size} (codebook_size in "
                             f"{CONFIG_FILE}) but the model's {mod.name!r} has vocabulary {mod.vocab_size}")
        self.image_input = c.enc_vit and c.patch_proj
        # The resolution that gives the model's grid (4M's tokenizers take any multiple of the patch).
        self.resolution = mod.grid[0] * c.patch_size if self.image_input else None
        _, tgrid = io_shapes(tok, (self.resolution, self.resolution) if self.image_input else None)
        self.token_shape = tuple(tgrid) if c.num_codebooks == 1 else (c.num_codebooks, *tgrid)
        if int(np.prod(self.token_shape)) != mod.num_tokens:
            raise AssetError(f"{folder}: tokenizer gives {int(np.prod(self.token_shape))} tokens "
                             f"{list(self.token_shape)} per sample, the model's {mod.name!r} has "
                             f"{mod.num_tokens} {list(mod.grid)}")

    def __repr__(self):
        return f"ML4MImageTokenizer({self.name} <- {self.folder.name}: {self.tok!r})"

    # -- native <-> 4M's tokenizer input ---------------------------------------------------
    def expected_shape(self, res: int) -> tuple:
        """A native batch's shape (as fourm's codecs give it)."""
        if self.stem in ("rgb", "normal"):
            return ("B", res, res, 3)
        if self.stem in ("depth", "semseg"):
            return ("B", res, res)
        raise AssetError(f"{self.name}: fourm cannot make {self.stem} inputs from an array here "
                         f"(4M computes them with a separate network); give token ids (.npy) instead")

    def resize(self, native: np.ndarray, res: int) -> np.ndarray:
        resample = Image.NEAREST if self.stem == "semseg" else Image.BICUBIC
        out = []
        for a in np.asarray(native):
            if a.dtype == np.uint8 or self.stem == "semseg":
                img = Image.fromarray(a.astype(np.uint8) if self.stem == "semseg" else a)
                out.append(np.asarray(img.resize((res, res), resample)).astype(a.dtype))
            else:  # float maps channel by channel (mode F)
                chans = a[..., None] if a.ndim == 2 else a
                out.append(np.stack([np.asarray(Image.fromarray(chans[..., k].astype(np.float32), "F")
                                                .resize((res, res), Image.BILINEAR))
                                     for k in range(chans.shape[-1])], -1).reshape((res, res) + a.shape[2:]))
        return np.stack(out)

    def to_input(self, native) -> np.ndarray:
        """Native [B, H, W(, C)] -> 4M's tokenizer input (NCHW float, or int class ids)."""
        self.expected_shape(1)  # rejects kinds without an image form
        x = np.asarray(native)
        if self.stem == "semseg":
            return x.astype(np.int32)
        if self.stem == "depth":
            return np.stack([truncated_standardise(d.astype(np.float32)) for d in x])[:, None]
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        if self.stem == "normal":
            x = x * 2.0 - 1.0 if np.asarray(native).dtype == np.uint8 else x
            return x.transpose(0, 3, 1, 2)
        if self.tok.cfg.undo_std:
            x = (x - IMAGENET_MEAN) / IMAGENET_STD
        else:
            x = x * 2.0 - 1.0
        return x.transpose(0, 3, 1, 2)

    def encode(self, native) -> np.ndarray:
        tokens = self.tok.tokenize(self.to_input(native))
        return tokens.reshape(tokens.shape[0], *self.grid)

    def decode(self, tokens) -> np.ndarray:
        t = np.asarray(tokens).reshape((-1,) + self.token_shape)
        if self.tok.cfg.cls == "DiVAE":
            out = self.tok.decode_tokens(t, timesteps=self.diffusion_steps, key=jax.random.key(self.seed),
                                         image_size=self.resolution)
        else:
            out = self.tok.decode_tokens(t)
        if self.stem == "rgb":
            return np.clip((out.transpose(0, 2, 3, 1) + 1.0) / 2.0, 0.0, 1.0)
        if self.stem == "normal":
            return np.clip(out.transpose(0, 2, 3, 1), -1.0, 1.0)
        if self.stem in ("depth", "canny_edge", "sam_edge"):
            return out[:, 0]
        if self.stem == "semseg":
            return out.argmax(1).astype(np.int32)
        return out  # feature maps / global vectors (B, C, h, w)

    def picture(self, native) -> np.ndarray | None:
        """uint8 RGB of one decoded sample (None for global feature vectors)."""
        a = np.asarray(native)
        if self.stem == "rgb":
            return vis.to_rgb(a)
        if self.stem == "normal":
            return vis.colorize_normals(a)
        if self.stem == "semseg":
            return vis.colorize_semseg(a)
        if a.ndim == 2 and self.stem in ("canny_edge", "sam_edge"):  # edge maps in [-1, 1]: grey
            return vis.to_rgb(np.clip((a + 1.0) / 2.0, 0.0, 1.0))
        if a.ndim == 2:  # depth: min-max normalised per map, as 4M shows it
            x = (a - a.min()) / max(float(a.max() - a.min()), 1e-9)
            return vis.colorize_depth(x + 1.0, vmin=1.0, vmax=2.0)
        if a.ndim == 3 and a.shape[1] > 1 and a.shape[2] > 1:  # feature map: first 3 PCA components
            return _pca_picture(a)
        return None


def _pca_picture(f: np.ndarray, size: int = 224) -> np.ndarray:
    c, h, w = f.shape
    x = f.reshape(c, -1).T.astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:3].T
    y = (y - y.min(0)) / np.maximum(y.max(0) - y.min(0), 1e-9)
    img = (y.reshape(h, w, -1) * 255).astype(np.uint8)
    img = np.concatenate([img, np.zeros((h, w, 3 - img.shape[-1]), np.uint8)], -1)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))


def boxes_to_draw(text: str, h: int, w: int) -> list[dict]:
    """4M's box text ("v0=x0 v1=y0 v2=x1 v3=y1 class ...", coordinates binned over [0, 1]) ->
    `fourm.data.visualize.draw_boxes` boxes in pixels of an h x w image."""
    return [{"box": [x0 * w, y0 * h, x1 * w, y1 * h], "class": c}
            for x0, y0, x1, y1, c in ml4m_text.text_to_boxes(text)]


# ---------------------------------------------------------------------------------------------
# finding and loading the folders
# ---------------------------------------------------------------------------------------------
def _inside(root: Path, rel: Any, key: str) -> Path:
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        raise AssetError(f"{root / MAP_FILE}: entry {key!r} must be a relative path inside {root}, got {rel!r}")
    p = (root / rel).resolve()
    if root.resolve() not in p.parents and p != root.resolve():
        raise AssetError(f"{root / MAP_FILE}: entry {key!r} = {rel!r} leaves {root}")
    return p


def read_map(root: Path) -> dict[str, Path]:
    path = root / MAP_FILE
    if not path.is_file():
        return {}
    doc = read_json_object(path, AssetError)  # {modality: folder}
    return {str(k): _inside(root, v, str(k)) for k, v in doc.items()}


def hub_folders(root: Path) -> dict[str, list[Path]]:
    """{modality stem: folders} for the subfolders named after 4M's hub names."""
    out: dict[str, list[Path]] = {}
    for d in sorted(c for c in root.iterdir() if c.is_dir()):
        m = _HUB_RE.search(d.name)
        if m and m.group("stem") in HUB_STEMS:
            for s in HUB_STEMS[m.group("stem")]:
                out.setdefault(s, []).append(d)
    return out


def folder_for(root: Path, name: str, mapping: Mapping[str, Path], hubs: Mapping[str, list[Path]]) -> Path:
    folder = mapping.get(name) or mapping.get(stem(name))
    if folder is None:
        found = hubs.get(stem(name), [])
        if len(found) > 1:  # e.g. the 224 and the 224-448 release side by side
            raise AssetError(f"--tokenizers {root}: several tokenizer folders for {name!r}: "
                             f"{[f.name for f in found]}; name the one to use in {root / MAP_FILE}")
        folder = found[0] if found else None
    if folder is None:
        hub = next((k for k, v in HUB_STEMS.items() if stem(name) in v), stem(name))
        raise AssetError(f"--tokenizers {root}: no tokenizer folder for {name!r} (expected a folder named "
                         f"4M_tokenizers_{hub}_<vocab>_<res>, e.g. from EPFL-VILAB/4M_tokenizers_{hub}_..., "
                         f"or an entry {{\"{name}\": \"<folder>\"}} in {root / MAP_FILE})")
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise AssetError(f"{folder}: a 4M tokenizer folder needs {CONFIG_FILE} and {WEIGHTS_FILE} (for {name!r})")
    return folder


def text_tokenizer_file(root: Path, mapping: Mapping[str, Path]) -> Path | None:
    """The WordPiece JSON: the map's "text" entry, else the one text_tokenizer*.json in TOK_DIR or
    in one of its folders."""
    if "text" in mapping:
        return mapping["text"]
    try:
        found = [f for d in [root] + sorted(c for c in root.iterdir() if c.is_dir())
                 if (f := ml4m_text.find_tokenizer_file(d)) is not None]
    except ValueError as e:  # several in one folder
        raise AssetError(f"--tokenizers {root}: {e}") from None
    if len(found) > 1:
        raise AssetError(f"--tokenizers {root}: several {TEXT_GLOB} files {[str(p) for p in found]}; "
                         f"name the one to use as \"text\" in {root / MAP_FILE}")
    return found[0] if found else None


def load_tokenizers(root: str | Path, spec, names: Sequence[str], *, diffusion_steps: int = DIFFUSION_STEPS,
                    seed: int = 0) -> dict[str, Any]:
    """{modality: ML4MImageTokenizer} for the grid modalities in `names`, plus {"text": the
    WordPiece tokenizer} when a sequence modality is among them. Errors name the folder."""
    root = Path(root)
    if not root.is_dir():
        raise AssetError(f"--tokenizers {root}: no such folder")
    mapping, hubs = read_map(root), hub_folders(root)
    out: dict[str, Any] = {}
    loaded: dict[Path, Tokenizer] = {}
    for name in dict.fromkeys(names):
        mod = spec.modality(name)
        if mod.kind == "sequence":
            if "text" not in out:
                path = text_tokenizer_file(root, mapping)
                if path is None:
                    raise AssetError(f"--tokenizers {root}: no {TEXT_GLOB} (4M's WordPiece tokenizer "
                                     f"text_tokenizer_4m_wordpiece_30k.json) for {name!r}")
                out["text"] = ml4m_text.ML4MTextTokenizer.load(path)
            continue
        if mod.kind != "grid":
            continue
        folder = folder_for(root, name, mapping, hubs)
        try:
            tok = loaded.get(folder) or load_folder(folder)
        except TokenizerConfigError as e:
            raise AssetError(str(e)) from None
        loaded[folder] = tok
        out[name] = ML4MImageTokenizer(mod, tok, folder, diffusion_steps=diffusion_steps, seed=seed)
    return out

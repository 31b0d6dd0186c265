"""`fourm-generate`: any-to-any generation from the command line, with pictures as output.

    fourm-generate --checkpoint DIR --tokenizers DIR --cond rgb=photo.png \\
        --targets depth,normals,caption --out runs/generate
    fourm-generate --checkpoint DIR --tokenizers DIR \\
        --cond caption="a red cube left of a blue sphere" --targets rgb,depth
    fourm-generate ... --targets depth:steps=12:temperature=0:guidance_scale=2,caption:top_p=0.9
    fourm-generate ... --cond rgb=photos/ --images_per_call 8 --targets depth,caption

Writes per sample and target a PNG (depth colour-mapped, normals as colours, segmentation with
its palette, RGB as is, boxes drawn on the RGB) or a .txt (captions, metadata), a side-by-side
grid of conditions and outputs (grid.png), the tokens (tokens.npz) and generation.json.
Names may be short (a registry field or alias: rgb, depth, normals, semseg, caption, det/boxes,
metadata, or a field you registered, e.g. edges) or the model's (tok_depth@64). Conditions: images (.png/.jpg/.bmp/.gif/.tif/.webp), arrays (.npy: token ids
or native depth / normals / classes), boxes / metadata (.json), text files (.txt) or literal text.
Sampling defaults to greedy decoding (fourm.generate.defaults, the same as the quickstart's and the
notebooks'). Prints the time to load, and to generate split into compile and run; compiled programs
are cached across runs (see `--compilation_cache`).

Official 4M checkpoints (config.json + model.safetensors of EPFL-VILAB/4M-*) run with 4M's
released tokenizer folders and WordPiece JSON in --tokenizers (which folder serves which modality:
`fourm.compat.ml4m_assets`), 4M's image preprocessing (center crop, bicubic resize) and 4M's
recommended sampler settings (--preset: auto | rgb2x | x2rgb | maskgit8 | config):

    fourm-generate --checkpoint 4M-21_XL_CC12M --tokenizers 4m_tokenizers \
        --cond rgb=photo.jpg --targets depth,normal,semseg,caption,det --out runs/4m

`fourm-generate-eval --checkpoint DIR --tokenizers DIR` scores RGB -> depth / normals / caption
on held-out procedural scenes against mean baselines (`fourm.generate.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from absl import app, flags

from fourm.cli import CommandError, entry, positive
from fourm.config import define_config_flag

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CONDITION_EXTS = IMAGE_EXTS + (".npy", ".json", ".txt")


def define_flags(fv, argv):
    define_config_flag("generate", fv, argv)
    d = dict(flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "model: fourm checkpoint (config.json + "
                        "model.safetensors) or an official 4M checkpoint folder", **d)
    flags.DEFINE_string("tokenizers", None, "folder of tokenizers (one subfolder each: image "
                        "tokenizer workdirs / exports, and the text tokenizer)", **d)
    flags.DEFINE_multi_string("cond", [], "condition NAME=VALUE (repeatable); VALUE is a file "
                              f"({', '.join(CONDITION_EXTS)}) or, for text modalities, literal text", **d)
    flags.DEFINE_list("targets", [], "targets in order, each NAME[:key=value[:key=value...]]", **d)
    flags.DEFINE_string("out", None, "output folder (default: config.out)", **d)
    flags.DEFINE_integer("seed", None, "random seed (default: config.seed)", **d)
    flags.DEFINE_integer("batch", None, "samples per condition set (default: config.batch)", **d)
    flags.DEFINE_string("preset", "auto", "sampler settings every target starts from: config (the "
                        "config's grid/text defaults) or one of 4M's: rgb2x, x2rgb, maskgit8; auto = "
                        "config for fourm checkpoints, 4M's rgb2x / x2rgb choice for 4M checkpoints", **d)
    flags.DEFINE_integer("diffusion_steps", 50, "4M DiVAE tokenizers: diffusion steps per decode", **d)
    flags.DEFINE_integer("images_per_call", 8, "with a folder condition (--cond rgb=DIR/): images "
                         "generated together in one batched call", **d)



# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def is_ml4m(path: str) -> bool:
    """An official 4M folder (its config.json has no fourm `format` key)."""
    p = Path(path) / "config.json"
    try:
        return p.is_file() and "format" not in json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_model(path: str):
    from fourm.model.pretrained import CONFIG_FILE, read_config, load_pretrained

    p = Path(path)
    if not p.is_dir():
        raise CommandError(f"--checkpoint {p}: no such folder (expected a fourm or 4M checkpoint folder)")
    if not (p / CONFIG_FILE).is_file():
        raise app.UsageError(f"--checkpoint {p}: no {CONFIG_FILE} there (expected a fourm or 4M "
                             "checkpoint folder)")
    doc = json.loads((p / CONFIG_FILE).read_text())
    if "format" in doc:
        read_config(p)
        return load_pretrained(p)
    from fourm.compat import ml4m

    return ml4m.load(p)


def load_tokenizers(path: str | None, needed: set[str] | None = None) -> dict[str, Any]:
    """{modality name: ImageTokenizer, "text": TextTokenizer} from a folder of tokenizer folders
    (the text tokenizer: fourm's, or 4M's WordPiece text_tokenizer*.json, at the top or in a folder).
    With `needed`, image tokenizers of other modalities are not loaded (their names are read from
    their config.json; the checks below still see every folder)."""
    if not path:
        return {}
    from fourm.compat import ml4m_text
    from fourm.tokenizers.export import peek_name
    from fourm.tokenizers.text import MODEL_FILE, TextTokenizer

    root = Path(path)
    if not root.is_dir():
        raise app.UsageError(f"--tokenizers {root}: no such folder")
    out, where = {}, {}
    for d in sorted([root] + [c for c in root.iterdir() if c.is_dir()]):
        wordpiece = ml4m_text.find_tokenizer_file(d)  # 4M's text_tokenizer_4m_wordpiece_30k.json
        if (d / MODEL_FILE).is_file() or wordpiece is not None:
            if "text" in out:
                raise CommandError(f"--tokenizers: {where['text']} and {d} both hold a text tokenizer; "
                                   "keep one")
            out["text"] = TextTokenizer.load(d) if wordpiece is None else ml4m_text.load(wordpiece)
            where["text"] = d
        elif d != root and ((d / "checkpoints").is_dir() or any(d.glob("*.json"))):
            name = peek_name(d)
            if name is None or needed is None or name in needed:
                try:
                    tok = load_image_tokenizer(d)
                except (FileNotFoundError, ValueError, KeyError) as e:
                    print(f"[fourm-generate] skipping {d}: {e}")
                    continue
                name = tok.name
            else:
                tok = None  # not needed by this run: named, not loaded
            if "@" in d.name and d.name != name:  # a folder named for another modality
                raise CommandError(f"--tokenizers: {d} holds the tokenizer of {name!r}, not of "
                                   f"{d.name!r}")
            if name in where:
                raise CommandError(f"--tokenizers: {where[name]} and {d} are both tokenizers of "
                                   f"{name!r}; keep one")
            where[name] = d
            if tok is not None:
                out[name] = tok
    if not where:
        raise app.UsageError(f"--tokenizers {root}: found no tokenizer folders inside")
    return out


def load_image_tokenizer(path: Path):
    """An image tokenizer from a training workdir (checkpoints/) or an exported folder."""
    import fourm.tokenizers as tokenizers_pkg

    return tokenizers_pkg.load(path)


def resolve_name(spec, name: str, role: str) -> str:
    """Model modality for a short or full name; conditions prefer pixel inputs (rgb@R) and
    targets token modalities (tok_rgb@R). 4M's stems (normal, det) work too."""
    from fourm import modalities as registry
    from fourm.generate.inputs import GenerationInputError

    if name in spec.names:
        return name
    field = registry.field_for_name(name)
    source = field.name if field is not None else name.lower()
    keys = {source, name.lower()}
    keys |= {"normal" for k in keys if k == "normals"} | {"det" for k in keys if k == "boxes"}
    cands = [m for m in spec.modalities if m.source in keys]
    if role == "target":
        cands = [m for m in cands if m.name in spec.domains_out]
    else:
        cands = sorted([m for m in cands if m.name in spec.domains_in], key=lambda m: m.kind != "pixels")
    if not cands:
        usable = spec.domains_out if role == "target" else spec.domains_in
        mine = sorted(n for f in registry.fields() for n in (f.name, *f.aliases) if any(
            m.source == f.name and m.name in usable for m in spec.modalities))
        what = (f"this model has no {role} modality {name!r}" if field is not None else
                f"unknown {role} modality {name!r}")
        raise GenerationInputError(f"--{'targets' if role == 'target' else 'cond'}: {what}; its "
                                   f"{role}s are {list(usable)} (short names: {mine})")
    return cands[0].name


# ------------------------------------------------------------------------------------------
# Conditions and targets from flags
# ------------------------------------------------------------------------------------------
def condition_path(value: str) -> Path | None:
    """The file a --cond VALUE names, or None for literal text: an existing file, or something
    that looks like a path (a known file extension, or a / in a value without spaces)."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    looks_like_path = p.suffix.lower() in CONDITION_EXTS + (".npz",) or (
        "/" in value and " " not in value.strip())
    return p if looks_like_path else None


def read_condition(mod, value: str, res: int, ml4m: bool = False):
    """A condition value: a file (image, .npy, .json, .txt) or literal text for sequences. Image
    files decode as the modality's registry field does (`fourm.data.fields`); ml4m: RGB images are
    prepared as 4M does (center crop, bicubic resize to res)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from fourm import modalities as registry
    from fourm.data import fields
    from fourm.tokenizers import structure

    flag = f"--cond {mod.name}={value}"
    field = registry.field(mod.source) if mod.source in registry.field_names() else None
    p = condition_path(value)
    if p is None:
        if mod.kind == "sequence":
            return value
        raise CommandError(f"{flag}: expected a file ({', '.join(CONDITION_EXTS)}); {mod.name} is not "
                           "a text modality")
    if not p.is_file():
        raise CommandError(f"{flag}: no such file")
    ext = p.suffix.lower()
    if ext in IMAGE_EXTS and ml4m and (mod.kind == "pixels" or mod.source == "rgb"):
        from fourm.compat import ml4m_assets

        return ml4m_assets.read_image(p, res)
    if ext in IMAGE_EXTS:
        try:
            img = Image.open(p)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise CommandError(f"{flag}: not a readable image ({e})") from None
        if mod.kind == "pixels" or field is None:
            return np.asarray(img.convert("RGB") if mod.kind == "pixels" else img)
        if field.layout in ("image", "normals") and field.decode is None:
            # Photos come in any mode (RGBA, palette, grey): convert, as for pixel inputs.
            arr = np.asarray(img.convert({1: "L", 3: "RGB", 4: "RGBA"}[field.channels]))
            arr = arr[..., None] if arr.ndim == 2 else arr
            return fields.decode_normals(arr) if field.layout == "normals" else arr
        if field.layout == "depth" and img.mode not in ("I", "I;16"):
            return np.asarray(img)

        def fail(problem):  # the field's own decoding and checks, as for a folder's files
            return CommandError(f"{flag}: {problem}")
        return fields.decode_value(field, p.read_bytes(), ext[1:], resolution=(img.height, img.width),
                                   fail=fail)
    if ext == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise CommandError(f"{flag}: not a plain .npy array ({e})") from None
        check_finite(arr, flag, mod)
        return arr
    if ext == ".json":
        try:
            obj = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CommandError(f"{flag}: not valid JSON ({e})") from None
        layout = field.layout if field is not None else None
        if layout == "boxes":
            return structure.boxes_to_text(obj, (res, res))
        if layout == "json":
            return structure.metadata_to_text(obj)
        raise CommandError(f"{flag}: JSON is only for boxes / metadata")
    if ext == ".txt":
        if mod.kind != "sequence":
            raise CommandError(f"{flag}: a .txt file is text; {mod.name} expects an image or .npy")
        return p.read_text(encoding="utf-8").strip()
    raise CommandError(f"{flag}: unsupported file type {ext or '(none)'}; expected one of "
                       f"{', '.join(CONDITION_EXTS)}")


def check_finite(arr, flag: str, mod) -> None:
    """Pixels must be finite; a native depth/normals array may have invalid pixels (masked by the
    tokenizer), but not only invalid ones."""
    import numpy as np

    if not np.issubdtype(arr.dtype, np.floating):
        return
    finite = np.isfinite(arr)
    if mod.kind == "pixels" and not finite.all():
        raise CommandError(f"{flag}: {int((~finite).sum())} NaN/Inf values; expected a finite image")
    if not finite.any():
        raise CommandError(f"{flag}: every value is NaN/Inf; expected a {mod.source} array with "
                           "valid values")


def parse_target(spec, item: str, cfg, preset: str = "config", rgb_given: bool = False):
    """A Target from NAME[:key=value...]: the config's defaults (preset "config": `grid_given_rgb`
    for a token grid when RGB is a condition, else `grid`) or a 4M preset
    (`fourm.compat.ml4m_assets.PRESETS`), then the options."""
    from fourm.generate.chain import Target

    name, *opts = item.split(":")
    name = resolve_name(spec, name.strip(), "target")
    m = spec.modality(name)
    base = dict(cfg.text) if m.kind == "sequence" else dict(cfg.grid_given_rgb if rgb_given else cfg.grid)
    if preset != "config":
        from fourm.compat import ml4m_assets

        base.update(ml4m_assets.preset_settings(preset, m))
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or k not in base:
            raise CommandError(f"--targets {item!r}: option {o!r} is not key=value with key in "
                               f"{sorted(base)}")
        kind = type(base[k])
        try:
            base[k] = kind(v) if kind is not bool else {"1": True, "true": True, "0": False,
                                                         "false": False}[v.lower()]
        except (ValueError, KeyError):
            raise CommandError(f"--targets {item!r}: {k}={v!r} is not a valid {kind.__name__}") from None
        if kind in (int, float) and not math.isfinite(base[k]):
            raise CommandError(f"--targets {item!r}: {k}={v!r}, expected a finite number")
    for k in ("steps", "max_new_tokens", "top_k"):
        if k in base and base[k] < (1 if k == "steps" else 0):
            raise CommandError(f"--targets {item!r}: {k}={base[k]}, expected "
                               f"{'a positive' if k == 'steps' else 'a non-negative'} number")
    for k in ("temperature", "guidance_scale"):
        if k in base and base[k] < 0:
            raise CommandError(f"--targets {item!r}: {k}={base[k]}, expected >= 0")
    if "top_p" in base and not 0 < float(base["top_p"]) <= 1:
        raise CommandError(f"--targets {item!r}: top_p={base['top_p']}, expected a value in (0, 1]")
    fields = {f.name for f in dataclasses.fields(Target)}
    kw = {k: v for k, v in base.items() if k in fields}
    kw["top_p"] = None if float(base["top_p"]) == 1.0 else float(base["top_p"])
    if m.kind == "sequence":
        kw["max_new_tokens"] = int(base["max_new_tokens"]) or None
    return Target(name, **kw)


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------
def picture(mod, native, tokens, rgb=None, text: str | None = None, res: int = 64, tok=None,
            ml4m: bool = False):
    """A uint8 RGB picture of a generated (or given) modality, or None for plain text. `tok`:
    the modality's tokenizer when it draws its own pictures (4M's); ml4m: 4M's box text."""
    import numpy as np

    from fourm import modalities as registry
    from fourm.data import visualize as vis
    from fourm.tokenizers import structure

    if mod.source in ("boxes", "det") and text is not None:
        base = rgb if rgb is not None else np.full((res, res, 3), 255, np.uint8)
        if ml4m:
            from fourm.compat import ml4m_assets

            boxes = ml4m_assets.boxes_to_draw(text, *base.shape[:2])
        else:
            boxes = structure.text_to_boxes(text, base.shape[:2], strict=False)
        return vis.draw_boxes(base, boxes, labels=True)
    if mod.kind == "sequence":
        return None
    if native is not None and hasattr(tok, "picture"):
        return tok.picture(native)
    if native is None:  # no tokenizer: show the token ids with a palette
        return vis.colorize_semseg(np.asarray(tokens))
    if mod.source in registry.field_names() and registry.field(mod.source).is_image_like:
        return vis.picture(mod.source, native)
    return vis.to_rgb(native)


def condition_picture(mod, value, b: int, res: int):
    """(picture or None, text or None) of a given condition for sample b."""
    import numpy as np

    from fourm import modalities as registry
    from fourm.data import fields
    from fourm.data import visualize as vis

    if isinstance(value, str):
        return None, value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return None, value[min(b, len(value) - 1)]
    arr = np.asarray(getattr(value, "value", value))
    if mod.kind == "sequence":
        return None, None
    ids = mod.kind == "grid" and np.issubdtype(arr.dtype, np.integer) and \
        arr.shape[-2:] == tuple(mod.grid)
    field = registry.field(mod.source) if mod.source in registry.field_names() else None
    if ids or field is None or not field.is_image_like:
        one = 2
    else:
        one = len(fields.expected_array(field, (1, 1))[0])
    batched = arr.ndim == (4 if mod.kind == "pixels" else one + 1)
    arr = arr[min(b, arr.shape[0] - 1)] if batched else arr
    if mod.kind == "pixels":
        return vis.to_rgb(arr), None
    if np.issubdtype(arr.dtype, np.integer) and arr.shape[:2] == tuple(mod.grid):
        return vis.colorize_semseg(arr), None  # token ids
    return picture(mod, arr, None, res=res), None


def run(argv, F) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fourm.generate.chain import Generator
    from fourm.runtime import CompileTimer

    cfg = F.config
    # Everything that needs no model first: a typo costs no model load.
    if not F.checkpoint:
        raise app.UsageError("--checkpoint is required")
    if not F.targets:
        raise app.UsageError("--targets is required (e.g. --targets depth,caption)")
    batch = positive("--batch", F.batch if F.batch is not None else int(cfg.batch))
    cond_items, folder_items = [], []
    for item in F.cond:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--cond {item!r}: expected NAME=VALUE")
        if Path(value).expanduser().is_dir():  # a folder of images: batched over its files
            folder_items.append((key.strip(), value, folder_files(item, Path(value).expanduser())))
            continue
        p = condition_path(value)
        if p is not None and not p.is_file():
            raise CommandError(f"--cond {item}: no such file")
        cond_items.append((key.strip(), value))
    if len(folder_items) > 1:
        raise CommandError(f"--cond: one folder condition at most, got {len(folder_items)} "
                           f"({', '.join(v for _, v, _ in folder_items)})")
    per_call = positive("--images_per_call", F.images_per_call)
    if folder_items and batch != 1:
        raise app.UsageError(f"--batch {batch} with a folder condition: each image is one sample; "
                             "use --images_per_call to set how many run together")
    if F.preset not in ("auto", "config", "rgb2x", "x2rgb", "maskgit8"):
        raise CommandError(f"--preset {F.preset!r}: expected auto, config, rgb2x, x2rgb or maskgit8")
    positive("--diffusion_steps", F.diffusion_steps)
    ml4m = is_ml4m(F.checkpoint)
    if ml4m and not F.tokenizers:
        raise CommandError("--tokenizers is required with a 4M checkpoint (the folder of "
                           "4M_tokenizers_* folders and text_tokenizer_4m_wordpiece_30k.json)")
    t0 = time.perf_counter()
    model = load_model(F.checkpoint)
    spec = model.spec
    res = next((m.grid[0] * m.patch_size for m in spec.modalities if m.kind == "pixels"), 64)
    if ml4m:  # 4M's image tokenizers use 16-px patches: without pixel input, tok_rgb's grid says it
        res = next((m.grid[0] * 16 for m in spec.modalities if m.name.startswith("tok_rgb@")), res)
    names = {resolve_name(spec, key, "condition"): value for key, value in cond_items}
    folder_name = resolve_name(spec, folder_items[0][0], "condition") if folder_items else None
    preset = F.preset
    given = list(names) + ([folder_name] if folder_name else [])
    if preset == "auto" and not ml4m:
        preset = "config"
    elif preset == "auto":
        from fourm.compat import ml4m_assets

        preset = ml4m_assets.auto_preset(given)
    rgb_given = any(spec.modality(n).source == "rgb" for n in given)
    targets = [parse_target(spec, t, cfg, preset, rgb_given) for t in F.targets]
    seed = cfg.seed if F.seed is None else F.seed
    conditions = {n: read_condition(spec.modality(n), v, res, ml4m) for n, v in names.items()}
    from fourm.generate.inputs import needing_tokenizer

    # Only the tokenizers this run needs (loading one costs ~0.3 s; 4M's released ones more).
    needed = [t.name for t in targets] + needing_tokenizer(spec, conditions)
    if folder_name and spec.modality(folder_name).kind != "pixels" and \
            any(f.suffix.lower() in IMAGE_EXTS for f in folder_items[0][2]):
        needed.append(folder_name)  # images of a token modality: tokenized
    if ml4m:
        from fourm.compat import ml4m_assets

        toks = ml4m_assets.load_tokenizers(F.tokenizers, spec, needed, seed=seed,
                                           diffusion_steps=F.diffusion_steps)
    else:
        toks = load_tokenizers(F.tokenizers, set(needed))
    gen = Generator(model, toks, resize=cfg.resize, loop=cfg.loop, kv_cache=cfg.kv_cache,
                    buckets=int(cfg.buckets))
    load_s = time.perf_counter() - t0
    if folder_items:
        print(f"time: load {load_s:.1f} s")
        return run_folder(gen, conditions, folder_name, folder_items[0][2], targets, seed, per_call,
                          Path(F.out or cfg.out), res, ml4m)
    t0 = time.perf_counter()
    with CompileTimer() as compiled:
        out = gen.generate(conditions, targets, seed=seed, batch_size=batch)
    gen_s = time.perf_counter() - t0
    write_outputs(Path(F.out or cfg.out), gen, conditions, targets, out, res, ml4m=ml4m)
    for n in out.notices:
        print(f"notice: {n}")
    for k, s in out.seconds.items():
        print(f"{k}: {s:.2f} s")
    print(f"time: load {load_s:.1f} s, generate {gen_s:.1f} s (compile {compiled.seconds:.1f} s, "
          f"run {gen_s - compiled.seconds:.1f} s)")
    return 0


def folder_files(item: str, folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and f.suffix.lower() in IMAGE_EXTS + (".npy",))
    if not files:
        raise CommandError(f"--cond {item}: no images ({', '.join(IMAGE_EXTS)}) or .npy arrays in "
                           "the folder")
    return files


def read_folder_chunk(mod, files: list[Path], res: int, ml4m: bool = False):
    """The conditions of `files` stacked into one batch; every file must have the same shape."""
    import numpy as np

    arrays = [np.asarray(read_condition(mod, str(f), res, ml4m)) for f in files]
    for f, a in zip(files[1:], arrays[1:]):
        if a.shape != arrays[0].shape:
            raise CommandError(f"--cond {mod.name}: {files[0].name} is {list(arrays[0].shape)} but "
                               f"{f.name} is {list(a.shape)}; a folder's images must share one "
                               "size (resize them first)")
    return np.stack(arrays)


def run_folder(gen, conditions: dict, name: str, files: list[Path], targets, seed: int,
               per_call: int, root: Path, res: int, ml4m: bool = False) -> int:
    """Generate for every file of a folder condition, `per_call` images per batched call: outputs
    in root/batch_NNN (as a single run writes them), root/images.json maps each file to its
    folder and sample; prints samples/s overall and after the first call (which compiles). A last,
    shorter call is padded to `per_call` (its last image repeated, the extra samples dropped), so
    it runs the programs the first call compiled."""
    import numpy as np

    from fourm.data.folder import atomic_write_bytes
    from fourm.runtime import CompileTimer

    mod = gen.spec.modality(name)
    index, times, compile_s = [], [], 0.0
    for i, lo in enumerate(range(0, len(files), per_call)):
        chunk = files[lo:lo + per_call]
        batch = read_folder_chunk(mod, chunk, res, ml4m)
        cond = dict(conditions, **{name: batch})
        pad = per_call - len(chunk) if lo > 0 else 0
        run_cond = dict(conditions, **{name: np.concatenate([batch, np.repeat(batch[-1:], pad, 0)])}) \
            if pad else cond
        t0 = time.perf_counter()
        with CompileTimer() as compiled:
            out = gen.generate(run_cond, targets, seed=seed)
        if pad:
            out = out.first(len(chunk))
        times.append((time.perf_counter() - t0, len(chunk)))
        compile_s += compiled.seconds
        sub = f"batch_{i:03d}"
        write_outputs(root / sub, gen, cond, targets, out, res, ml4m=ml4m)
        index += [{"file": str(f), "folder": sub, "sample": j} for j, f in enumerate(chunk)]
        for n in out.notices:
            print(f"notice: {n}")
    atomic_write_bytes(root / "images.json", json.dumps(index, indent=1).encode())
    total_s, n = sum(t for t, _ in times), len(files)
    line = (f"generated {n} images in {len(times)} calls of up to {per_call}: {total_s:.1f} s "
            f"(compile {compile_s:.1f} s), {n / total_s:.2f} samples/s")
    if len(times) > 1:  # the calls after the first reuse its compiled programs
        rest_s, rest_n = sum(t for t, _ in times[1:]), sum(k for _, k in times[1:])
        line += f"; after the first call {rest_n / rest_s:.2f} samples/s"
    print(line)
    return 0


def write_outputs(root: Path, gen, conditions, targets, out, res: int, ml4m: bool = False) -> None:
    import io

    import numpy as np

    from fourm.data import visualize as vis
    from fourm.data.folder import atomic_write_bytes

    spec = gen.spec
    root.mkdir(parents=True, exist_ok=True)
    batch = next(iter(out.tokens.values())).shape[0]
    rgb_cond = next((np.asarray(v) for k, v in conditions.items() if spec.modality(k).kind == "pixels"
                     and not isinstance(v, str)), None)
    rows, captions, titles = [], [], None
    for b in range(batch):
        cells, names, texts = [], [], []
        for k, v in conditions.items():
            pic, text = condition_picture(spec.modality(k), v, b, res)
            if pic is not None:
                cells.append(pic)
                names.append(f"{k} (given)")
            if text is not None:
                texts.append(f"{k} (given): {text}")
        rgb = rgb_cond[b] if rgb_cond is not None and rgb_cond.ndim == 4 else rgb_cond
        for t in targets:
            m = spec.modality(t.name)
            text = out.text.get(t.name, [None] * batch)[b]
            native = out.decoded.get(t.name)
            pic = picture(m, None if native is None else native[b], out.tokens[t.name][b], rgb, text, res,
                          tok=gen.image_tokenizers.get(t.name), ml4m=ml4m)
            stem = f"{b:03d}_{t.name.replace('@', '_')}"
            if pic is not None:
                vis.save_png(root / f"{stem}.png", pic)
                cells.append(pic)
                names.append(t.name)
            elif native is not None:  # no picture form (e.g. 4M's global feature vectors)
                buf = io.BytesIO()
                np.save(buf, np.asarray(native[b]), allow_pickle=False)
                atomic_write_bytes(root / f"{stem}.npy", buf.getvalue())
            if text is not None:
                atomic_write_bytes(root / f"{stem}.txt", (text + "\n").encode("utf-8"))
                texts.append(f"{t.name}: {text}")
        rows.append(cells)
        captions.append(" | ".join(texts))
        titles = titles or names
    if any(rows):
        vis.save_png(root / "grid.png", vis.make_grid(rows, captions=captions, col_titles=titles))
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in out.tokens.items()})
    atomic_write_bytes(root / "tokens.npz", buf.getvalue())
    meta = {"targets": [dataclasses.asdict(t) | {"commit_step": None, "guidance": t.guidance}
                        for t in targets],
            "conditions": sorted(conditions), "notices": out.notices, "seconds": out.seconds,
            "text": out.text}
    atomic_write_bytes(root / "generation.json", json.dumps(meta, indent=1, default=str).encode())
    print(f"wrote {root} ({len(targets)} targets x {batch} samples, grid.png)")


# ------------------------------------------------------------------------------------------
# fourm-generate-eval
# ------------------------------------------------------------------------------------------
def eval_run(argv, F) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fourm.generate.chain import Generator, Target
    from fourm.generate.evaluate import evaluate_scenes, format_figures

    cfg = F.config
    if not F.checkpoint:
        raise app.UsageError("--checkpoint is required")
    e = cfg.eval
    positive("--config.eval.num", int(e.num))
    positive("--config.eval.batch_size", int(e.batch_size))
    gen = Generator(load_model(F.checkpoint), load_tokenizers(F.tokenizers), loop=e.loop)
    grid = parse_target(gen.spec, f"tok_depth@{e.resolution}", cfg, rgb_given=True) if \
        f"tok_depth@{e.resolution}" in gen.spec.names else Target("?")
    grid = dataclasses.replace(grid, temperature=float(e.grid_temperature))
    cap = Target("caption", temperature=float(e.text_temperature),
                 max_new_tokens=int(cfg.text.max_new_tokens) or None)
    fig = evaluate_scenes(gen, seed=cfg.seed if F.seed is None else F.seed, start=e.start,
                          num=e.num, resolution=e.resolution, batch_size=e.batch_size,
                          train_scenes=e.train_scenes, grid_target=grid, caption_target=cap,
                          workers=cfg.num_workers)
    print(format_figures(fig))
    out = Path(F.out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    from fourm.data.folder import atomic_write_bytes

    atomic_write_bytes(out / "eval.json", json.dumps(fig, indent=1, default=float).encode())
    return 0


main = entry(__name__)
eval_main = entry(__name__, "eval_run", prog="fourm-generate-eval")

if __name__ == "__main__":
    main()

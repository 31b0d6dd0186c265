"""Modality codecs: how a modality's native arrays become network inputs and come back.

A codec owns everything modality-specific about an image-like tokenizer: the native array
contract (checked in Python, with errors naming expected vs got), the normalisation into the
network's input (pure JAX, so it is traced into the jitted and exported encode), the inverse
from the decoder output back to native values, and the loss. A new image-like modality is a
config naming one of these codecs (`codec.kind`) with its parameters; a new *kind* of data is a
new class registered with `register_codec` (from a user's module, see `fourm.modalities`).

Depth normalisation (decided here, documented in the exported config): tokens see
`log(depth)` mapped linearly from `[log min_depth, log max_depth]` to [-1, 1]. A fixed global range
(instead of 4M's per-image robust normalisation of the input) means tokens decode back to metres
with no side information; the per-image robust normalisation is kept as a loss term
(`losses.depth_loss`). Invalid depth (NaN, inf, <= 0) is masked out of the loss, counted, and
filled with the image's median valid log-depth before encoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fourm.tokenizers import losses


class Codec:
    kind: str = ""
    in_channels: int = 0
    out_channels: int = 0
    native_channels: int | None = None  # None: native array is [B, H, W]
    native_desc: str = ""
    resize_method: str = "nearest"

    def __init__(self, modality: str, cfg):
        self.modality = modality
        self.cfg = cfg

    # -- Python-side checks (bad input -> clear error) -------------------------------------
    def expected_shape(self, resolution: int) -> tuple:
        tail = (self.native_channels,) if self.native_channels else ()
        return ("B", resolution, resolution) + tail

    def check(self, x, resolution: int, *, allow_resize: bool = False) -> np.ndarray:
        """Validate (and, only when allowed, resize) a native batch; returns a numpy array."""
        x = np.asarray(x)
        exp = self.expected_shape(resolution)
        got = f"{x.dtype}{list(x.shape)}"
        want = f"{self.native_desc}[{', '.join(map(str, exp))}]"
        if x.ndim != len(exp) or (self.native_channels and x.shape[-1] != self.native_channels):
            raise ValueError(f"{self.modality} tokenizer: expected a batch {want}, got {got} "
                             "(wrong number of dimensions or channels)")
        self.check_dtype(x, want, got)
        if x.shape[1:3] != (resolution, resolution):
            if not allow_resize:
                raise ValueError(
                    f"{self.modality} tokenizer: expected spatial size {resolution}x{resolution}, got "
                    f"{x.shape[1]}x{x.shape[2]} ({got}); resize the input or set resize_input=True "
                    "in the tokenizer config")
            x = self.resize(x, resolution)
        return x

    def check_dtype(self, x, want, got):
        pass

    def resize(self, x: np.ndarray, resolution: int) -> np.ndarray:
        shape = (x.shape[0], resolution, resolution) + x.shape[3:]
        method = self.resize_method
        out = jax.image.resize(jnp.asarray(x, jnp.float32), shape, method,
                               antialias=method != "nearest")
        return np.asarray(out).astype(x.dtype) if method == "nearest" else np.asarray(out)

    # -- pure JAX -----------------------------------------------------------------------------
    def to_input(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Native batch -> (network input float32[B,H,W,in_channels], valid bool[B,H,W])."""
        raise NotImplementedError

    def from_output(self, y: jax.Array) -> jax.Array:
        """Decoder output -> native batch."""
        raise NotImplementedError

    def loss(self, y: jax.Array, x: jax.Array):
        """Loss and metrics of decoder output `y` against the native batch `x`."""
        raise NotImplementedError

    def normalisation(self) -> dict:
        """What the exported config records about the native <-> network mapping."""
        return {}


class ImageCodec(Codec):
    """uint8 images (RGB by default) mapped to [-1, 1]."""

    kind = "image"
    native_desc = "uint8"
    resize_method = "linear"

    def __init__(self, modality, cfg):
        super().__init__(modality, cfg)
        self.native_channels = self.in_channels = self.out_channels = int(cfg.get("channels", 3))

    def check_dtype(self, x, want, got):
        if x.dtype != np.uint8:
            raise ValueError(f"{self.modality} tokenizer: expected {want}, got {got}; convert "
                             "float images with (x * 255).round().astype(np.uint8)")

    def resize(self, x, resolution):
        return np.clip(np.round(super().resize(x, resolution)), 0, 255).astype(np.uint8)

    def to_input(self, x):
        x = x.astype(jnp.float32) / 127.5 - 1.0
        return x, jnp.ones(x.shape[:3], bool)

    def from_output(self, y):
        return jnp.clip(jnp.round((y + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def loss(self, y, x):
        xin, valid = self.to_input(x)
        return losses.image_loss(y, xin, valid, l1_weight=self.cfg.get("l1_weight", 0.0),
                                 l2_weight=self.cfg.get("l2_weight", 1.0))

    def normalisation(self):
        return {"kind": "uint8_to_unit_range", "formula": "x / 127.5 - 1"}


class DepthCodec(Codec):
    kind = "depth"
    in_channels = out_channels = 1
    native_desc = "float32 metres"

    def __init__(self, modality, cfg):
        super().__init__(modality, cfg)
        self.min_depth, self.max_depth = float(cfg.min_depth), float(cfg.max_depth)
        if not 0 < self.min_depth < self.max_depth:
            raise ValueError(f"depth codec: need 0 < min_depth < max_depth, got "
                             f"{self.min_depth}, {self.max_depth}")
        self._lo, self._hi = np.log(self.min_depth), np.log(self.max_depth)

    def check_dtype(self, x, want, got):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{self.modality} tokenizer: expected {want}, got {got}")

    def to_input(self, x):
        x = x.astype(jnp.float32)
        valid = jnp.isfinite(x) & (x > 0)
        logd = jnp.log(jnp.clip(jnp.where(valid, x, self.min_depth), self.min_depth, self.max_depth))
        n = 2.0 * (logd - self._lo) / (self._hi - self._lo) - 1.0

        def medians(n):  # a sort per image: most of an encode's cost on CPU, so only when needed
            med = jnp.nanmedian(jnp.where(valid, n, jnp.nan).reshape(n.shape[0], -1), axis=1)
            return jnp.where(jnp.isfinite(med), med, 0.0)

        # Without invalid pixels in the batch the fill value is never used.
        med = jax.lax.cond(jnp.all(valid), lambda n: jnp.zeros(n.shape[:1], n.dtype), medians, n)
        n = jnp.where(valid, n, med[:, None, None])
        return n[..., None], valid

    def from_output(self, y):
        n = jnp.clip(y[..., 0].astype(jnp.float32), -1.0, 1.0)
        return jnp.exp((n + 1.0) / 2.0 * (self._hi - self._lo) + self._lo)

    def loss(self, y, x):
        xin, valid = self.to_input(x)
        return losses.depth_loss(y, xin, valid, ssi_weight=self.cfg.get("ssi_weight", 0.5))

    def normalisation(self):
        return {"kind": "log_depth_fixed_range", "min_depth": self.min_depth,
                "max_depth": self.max_depth,
                "formula": "2 * (log(clip(d, min, max)) - log(min)) / (log(max) - log(min)) - 1",
                "invalid": "NaN/inf/<=0 masked; filled with the image's median valid value"}


class NormalsCodec(Codec):
    kind = "normals"
    in_channels = out_channels = native_channels = 3
    native_desc = "float32 unit vectors"
    resize_method = "linear"

    def check_dtype(self, x, want, got):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{self.modality} tokenizer: expected {want}, got {got}")

    def to_input(self, x):
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0) ** 2, -1))
        valid = jnp.all(jnp.isfinite(x), -1) & (norm > 0.5)
        return jnp.where(valid[..., None], x / jnp.maximum(norm, 1e-6)[..., None], 0.0), valid

    def from_output(self, y):
        return losses.l2_normalize(y.astype(jnp.float32))

    def loss(self, y, x):
        xin, valid = self.to_input(x)
        return losses.normals_loss(y, xin, valid, l1_weight=self.cfg.get("l1_weight", 0.1))

    def normalisation(self):
        return {"kind": "unit_vectors", "invalid": "non-finite or norm <= 0.5 -> zero vector"}


class ClassesCodec(Codec):
    """Integer class maps (semantic segmentation): one-hot in, logits out."""

    kind = "classes"
    native_desc = "int class ids"

    def __init__(self, modality, cfg):
        super().__init__(modality, cfg)
        self.num_classes = int(cfg.num_classes)
        self.ignore_index = int(cfg.get("ignore_index", 255))
        self.in_channels = self.out_channels = self.num_classes

    def check_dtype(self, x, want, got):
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"{self.modality} tokenizer: expected {want}, got {got}")
        bad = (x < 0) | ((x >= self.num_classes) & (x != self.ignore_index))
        if bad.any():
            raise ValueError(f"{self.modality} tokenizer: class ids must be in [0, {self.num_classes}) "
                             f"or {self.ignore_index} (ignored); got {int(bad.sum())} pixels outside, "
                             f"e.g. {int(x[bad][0])}")

    def to_input(self, x):
        valid = (x >= 0) & (x < self.num_classes)
        return jax.nn.one_hot(jnp.where(valid, x, 0), self.num_classes) * valid[..., None], valid

    def from_output(self, y):
        return jnp.argmax(y, -1).astype(jnp.int32)

    def loss(self, y, x):
        _, valid = self.to_input(x)
        return losses.classes_loss(y, jnp.where(valid, x, 0), valid,
                                   label_smoothing=self.cfg.get("label_smoothing", 0.0))

    def normalisation(self):
        return {"kind": "one_hot_classes", "num_classes": self.num_classes,
                "ignore_index": self.ignore_index}


CODECS = {c.kind: c for c in (ImageCodec, DepthCodec, NormalsCodec, ClassesCodec)}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Add a codec class (a new kind of data) under `cls.kind`; usable as a class decorator in a
    user's module named by the config field `modules`, then as `codec.kind` in tokenizer configs."""
    if not (isinstance(cls, type) and issubclass(cls, Codec)) or not cls.kind:
        raise ValueError(f"register_codec takes a Codec subclass with a `kind`, got {cls!r}")
    if CODECS.get(cls.kind, cls) is not cls:
        raise ValueError(f"codec kind {cls.kind!r} is already registered ({CODECS[cls.kind].__name__})")
    CODECS[cls.kind] = cls
    return cls


def make_codec(cfg) -> Codec:
    kind = cfg.codec.kind
    if kind not in CODECS:
        raise ValueError(f"tokenizer config codec.kind={kind!r}; known: {sorted(CODECS)}")
    return CODECS[kind](cfg.modality, cfg.codec)

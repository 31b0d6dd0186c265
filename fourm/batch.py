"""The masked batch: the one contract between masking (data side) and the model.

Masking (`fourm.masking`) turns one sample's per-modality tokens into fixed-length encoder and
decoder arrays; grain batches them; the model consumes them. Shapes are static: `N_enc` input
slots and `N_dec` target slots, padded, so XLA compiles once.

Slot order: modality blocks in the model's modality order, ascending position within a modality,
padding at the end. Masks here are **True = present** (the opposite of ml-4m's `input_mask`,
where True means masked out; `fourm.compat.ml4m` converts).

Keys (leading batch dim B added by batching):

  enc_ids     int32[N_enc]   token id of the slot (0 for pixel-modality slots and padding)
  enc_mod     int32[N_enc]   index of the slot's modality in the model's modality list
  enc_pos     int32[N_enc]   position within that modality (raster index / sequence index)
  enc_valid   bool [N_enc]   real token (False = padding; never attended to)
  pixels/<m>  float32[H,W,C] per pixel-input modality m: the (normalised) image; the model
                             patchifies it and picks patch `enc_pos` for slots of modality m
  dec_ids     int32[N_dec]   decoder input token: for sequence targets the token at `dec_pos`
                             (teacher forcing); ignored for grid targets (mask token is used)
  dec_targets int32[N_dec]   id to predict at the slot
  dec_mod     int32[N_dec]   modality index of the slot
  dec_pos     int32[N_dec]   position within the modality
  dec_valid   bool [N_dec]   real slot (query and key); False = padding
  dec_loss    bool [N_dec]   slot contributes to the loss (a sequence span's last input token
                             predicts nothing)

Decoder self-attention: key j is visible to query i iff both valid, same modality, and (grid
modality, or sequence modality with j <= i in slot order). Cross-attention sees every valid
encoder slot.
"""

from __future__ import annotations

import numpy as np

ENC_KEYS = ("enc_ids", "enc_mod", "enc_pos", "enc_valid")
DEC_KEYS = ("dec_ids", "dec_targets", "dec_mod", "dec_pos", "dec_valid", "dec_loss")
PIXELS_PREFIX = "pixels/"

# 4M's RGBTransform(imagenet_default_mean_and_std=True): x in [0, 1], then (x - mean) / std.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_UINT8_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_FLOAT_SCALE = (1.0 / IMAGENET_STD).astype(np.float32)
_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalise_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] HWC -> float32 ImageNet-normalised (as 4M's rgb input)."""
    # One scale and offset per channel, tiled along a whole row and applied in place: numpy's
    # inner loop then runs over W*C values instead of C=3 (4x faster; this runs per sample on CPU).
    h, w, c = x.shape
    y = x.astype(np.float32).reshape(h, w * c)
    y *= np.tile(_UINT8_SCALE if x.dtype == np.uint8 else _FLOAT_SCALE, w)
    y += np.tile(_OFFSET, w)
    return y.reshape(h, w, c)

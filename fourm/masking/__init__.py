"""4M multimodal masking: per-sample numpy transform from per-modality tokens to `fourm.batch`.

    transform = MaskingTransform(modalities.resolve(["rgb@64", "tok_rgb@64", "caption"]), 64, 64)
    masked = transform(sample, np.random.default_rng(0))   # or ds.random_map(GrainMasking(transform))

Modules: `budgets` (Dirichlet mixture -> per-modality counts), `spans` (T5 span / chunk masking in
4M's format), `transform` (the transform, grain wrapper, collate, config), `__main__` (benchmark).

Same as ml-4m's `UnifiedMasking`: mixture of Dirichlets with alpha 0 = never; disjoint random input
and target positions in image-like modalities; EOS appended then truncation to max_length; span
masking with sentinels from [S_1], targets `[S_1] span [S_2] ... [S_k+1]`; the keep schemes
random/all/binary and the lowering of the keep probability until the input fits; input budget 0 =
no sequence input at all; cropping an over-long target at a random sentinel (4M's rule); the decoder
sees a sequence target of T tokens as T - 1 teacher-forced slots; ImageNet mean/std for RGB pixels.

Deliberate differences (none changes the batch format):
* budgets are fixed (4M samples them from a range) and met exactly where possible: slots a sequence
  does not use go to image modalities of the same component (4M pads them);
* a sequence target's cost is its T - 1 decoder slots (4M counts T tokens but also uses T - 1 slots);
* counts come from a capped allocation instead of 4M's rejection loop on min/max tokens;
* the keep probability is lowered over one uniform draw per unit rather than by redrawing;
* random numbers come from the numpy Generator grain hands us, so draws are not bitwise 4M's;
* decoder blocks follow the modality order (4M shuffles them; with per-modality attention blocks the
  outputs are identical, see the fixture README section 6).
"""

from fourm.batch import IMAGENET_MEAN, IMAGENET_STD, normalise_pixels  # the pixel contract lives there
from fourm.masking.budgets import MixtureComponent, allocate, draw_proportions
from fourm.masking.transform import (
    GrainMasking,
    MaskingInputError,
    MaskInfo,
    MaskingTransform,
    collate,
    default_config,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "GrainMasking", "MaskingInputError", "MaskInfo", "MaskingTransform",
    "MixtureComponent", "allocate", "collate", "default_config", "draw_proportions",
    "normalise_pixels",
]

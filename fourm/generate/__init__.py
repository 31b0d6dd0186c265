"""Any-to-any generation: samplers (pure, jitted, lax loops) and chained generation.

    from fourm.generate import Generator, Target
    out = Generator(model, tokenizers).generate({"rgb@64": image}, ["tok_depth@64", "caption"])

Modules:
  schedules       tokens per step (cosine / linear / constant), temperature and guidance schedules
  sampling        top-k / top-p filtering, temperature sampling, guidance arithmetic
  maskgit         MaskGIT and ROAR iterative decoding of image-like targets (lax.scan)
  autoregressive  KV-cached autoregressive decoding of sequences (lax.while_loop)
  model_fns       the model side: logits functions over `FourM` (+ `fourm.model.decoding`)
  inputs          conditions -> per-modality state -> encoder slots
  chain           the Python API: `Generator`, `Target`, `generate`
  evaluate        quality on held-out scenes against mean baselines
"""

from fourm.generate.chain import (Generation, GenerationInputError, Generator, Normalised, Partial,
                                  Target, generate)
from fourm.generate.sampling import Filter

__all__ = ["Filter", "Generation", "GenerationInputError", "Generator", "Normalised", "Partial",
           "Target", "generate"]

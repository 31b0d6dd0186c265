"""Model-only config: `--config model:<size>[_<variant>]`, e.g. model:tiny, model:base_gelu.

Sizes: tiny, small, base, large, xlarge (4M's). Variants: swiglu (default; 4M's released
SwiGLU-without-biases models), swiglu_qknorm, gelu (GELU with biases). The fields are documented
in fourm/model/sizes.py (`model_config`).
"""

from fourm.config import common_config
from fourm.model.sizes import SIZES, VARIANTS, model_config


def get_config(arg=None):
  size, _, variant = (arg or "tiny").partition("_")
  if size not in SIZES:
    raise ValueError(f"--config model:{arg}: unknown size {size!r}; known: {sorted(SIZES)}")
  variant = variant or "swiglu"
  if variant not in VARIANTS:
    raise ValueError(f"--config model:{arg}: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
  c = common_config()
  c.model = model_config(size, variant)
  return c

"""4M's MLP tokenizer encoders / decoders (fourm/vq/models/mlp_models.py), applied point-wise.

`BottleneckMLP`: linear_in -> blocks of x + Linear(GELU(Linear(LayerNorm(x)))) -> linear_out.
`MLP` (StandardMLP): linear_in -> [LayerNorm -> Linear] * (blocks - 1) -> linear_out (no
activation, as in 4M). Both use torch's default LayerNorm eps 1e-5 (not the ViT's 1e-6).
"""

from __future__ import annotations

from fourm.compat.ml4m_tokenizers.config import MLPArch
from fourm.compat.ml4m_tokenizers.vit import gelu, layer_norm, linear

MLP_LN_EPS = 1e-5


def mlp_net(p, x, arch: MLPArch):
    """(B, C, H, W) -> (B, C_out, H, W), every pixel / token independently."""
    b, c, h, w = x.shape
    t = linear(x.reshape(b, c, h * w).transpose(0, 2, 1), p["linear_in"])
    if arch.kind == "BottleneckMLP":
        for bp in p["blocks"]:
            t = t + linear(gelu(linear(layer_norm(t, bp["norm"], MLP_LN_EPS), bp["fc1"])), bp["fc2"])
    else:
        for lp in p["layers"]:
            t = linear(layer_norm(t, lp["norm"], MLP_LN_EPS), lp["linear"])
    out = linear(t, p["linear_out"])
    return out.transpose(0, 2, 1).reshape(b, -1, h, w)

"""fourm: JAX-native any-to-any masked multimodal modeling (4M family)."""

__version__ = "0.1.0"

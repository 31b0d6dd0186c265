"""Benchmarks (`fourm-bench`; each module also runs alone as `python -m fourm.bench.<name>`)."""

from fourm.runtime import choose_platform

# `python -m fourm.bench.<name>` does not go through the console runner, and JAX reads its
# platform when first imported: without this, an installed libtpu probes for a TPU on CPU machines.
choose_platform()

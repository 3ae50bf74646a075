"""dtq-jax: Deep Transferring Quantization (ECCV 2020) in JAX/Flax.

Modules and their one responsibility each: README.md, "Code layout".
"""

"""Infrastructure every layer may use: files, locks, caches, errors.

files (atomic writes, JSON), locks (one run per workdir), caches (the cache
root and the XLA compilation cache), allocator (glibc malloc settings),
errors (the user-facing error types), quiet (the libraries' notes hidden
unless --verbosity). Imports nothing else of dtq_jax.
"""

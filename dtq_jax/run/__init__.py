"""A training run: the loop, the teacher, checkpoints, configs.

experiment (a config's runs: seeds, methods, the workdir), train (the loop),
teacher (the frozen teacher, cached), checkpoints (orbax, atomic, resumable),
run_result (result.json), runtime (devices, mesh, XLA settings),
distributed (several processes), config_validation (every field checked),
saved_configs (a saved config and how another differs), launch (main.py's
start-up). Imports every layer below it; nothing imports it but deploy and the
commands.
"""

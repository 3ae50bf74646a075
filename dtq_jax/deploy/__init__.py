"""Deployment: a trained student exported and run with integers.

export (a run's student as a .dtq or ONNX file, and loading it back),
export_check (an export against its run), dtq_format (the .dtq file),
int_inference (integer convolutions), onnx_export (the ONNX graph). The top
layer: imports any other; the command is dtq_jax/export.py.
"""

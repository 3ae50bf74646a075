"""Deployment: a trained student exported and run with integers.

export (a run's student as a .dtq, ONNX or StableHLO file, and loading it
back), runs (reading the run it comes from), export_check (an export against
its run), dtq_format (the .dtq file), int_inference (integer convolutions),
onnx_export (the ONNX graph of the zoo's networks), jaxpr_onnx (the ONNX
graph of any network, from its jaxpr), stablehlo_export (the portable
jax.export module). The top layer: imports any other; the command is
dtq_jax/export.py.
"""

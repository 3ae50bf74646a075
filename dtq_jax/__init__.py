"""dtq-jax: Deep Transferring Quantization (ECCV 2020) in JAX/Flax.

The package is cut by concern, in layers; a module imports only from its own
layer or the layers below it (tests/test_layout.py checks this):

  infra/    files, locks, caches, the allocator, the error types
  quant     the paper's fake quantizer (JAX only): the public library
  learned_quant  LSQ, LSQ+ and PACT quantizers with learned steps (JAX only)
  convolution  the 2-D convolution they compute (lax, or a rewrite of it)
  layers    quantized Conv layers (Flax), injected into the models
  models/   ResNets, MobileNetV2, the demo ResNet (take an injected conv),
            and a user's own Flax classifier reached by method interception
  data/     image sources, per-class splits, tf.data input, augmentation
  method/   DTQ and the baselines: attention, losses, networks, the step
  weights/  torchvision checkpoints converted to Flax variables; a user's
            own Flax checkpoints read
  run/      a training run: the loop, the teacher, checkpoints, configs
  deploy/   exports: the .dtq format, integer inference, ONNX, StableHLO

and the commands at the top: ``python -m dtq_jax.export`` (export.py),
``python -m dtq_jax.plot`` (plot.py), ``python -m dtq_jax.pretrained``
(pretrained.py). main.py at the repository root starts a run.
"""

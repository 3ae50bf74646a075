"""DTQ on CUB-200-2011 (official 5994 train / 5794 test).

Command (ResNet-50, 4-bit weights and activations, DTQ):

  python main.py --config=configs/cub200.py --workdir=runs/cub200

Variants without editing this file: ``configs/cub200.py:mobilenet_v2,5bit``
(network: resnet50 | mobilenet_v2; bits: 2bit .. 5bit | 32bit; method: fp | ft |
l2 | l2sp | delta | dtq; ``quick`` for a few steps on tiny images), and any field
with ``--config.FIELD=VALUE`` (e.g. ``--config.repeats=1`` for one seed
instead of the authors' five).

Data: TFDS caltech_birds2011 (downloaded on first use, or prepared in --config.dataset.data_dir).
Schedule: 9000 iterations at batch 64 over 5994 training images = 96
epochs, learning rate x0.1 at epoch 64.
The paper reports DTQ above DELTA-Q; no number is reproduced in docs/method.md.
"""

from configs import common


def get_config(arg=None):
  """Returns the config; ``arg`` selects variants (see module docstring)."""
  return common.paper_config(dict(name='caltech_birds2011'), arg)

"""DTQ on Food-101 (official 750 train / 250 test images per class).

Command (ResNet-50, 4-bit weights and activations, DTQ):

  python main.py --config=configs/food101.py --workdir=runs/food101

Variants without editing this file: ``configs/food101.py:mobilenet_v2,5bit``
(network: resnet50 | mobilenet_v2; bits: 2bit .. 5bit | 32bit; method: fp | ft |
l2 | l2sp | delta | dtq; ``quick`` for a few steps on tiny images), and any field
with ``--config.FIELD=VALUE`` (e.g. ``--config.repeats=1`` for one seed
instead of the authors' five).

Data: TFDS food101 (downloaded on first use, or prepared in --config.dataset.data_dir).
Schedule: 9000 iterations at batch 64 over 75750 training images = 8
epochs, learning rate x0.1 at epoch 5.
The paper reports DTQ above DELTA-Q; no number is reproduced in docs/method.md.
"""

from configs import common


def get_config(arg=None):
  """Returns the config; ``arg`` selects variants (see module docstring)."""
  return common.paper_config(dict(name='food101'), arg)

"""DTQ on Caltech 256-60 (60 train / 20 test images per class, 257 classes).

Command (ResNet-50, 4-bit weights and activations, DTQ):

  python main.py --config=configs/caltech256_60.py --workdir=runs/caltech256_60

Variants without editing this file: ``configs/caltech256_60.py:mobilenet_v2,5bit``
(network: resnet50 | mobilenet_v2; bits: 2bit .. 5bit | 32bit; method: fp | ft |
l2 | l2sp | delta | dtq; ``quick`` for a few steps on tiny images), and any field
with ``--config.FIELD=VALUE`` (e.g. ``--config.repeats=1`` for one seed
instead of the authors' five).

Data: Caltech-256 as data/256_ObjectCategories/<class>/*.jpg; the split is drawn per class with dataset.data_seed.
Schedule: 9000 iterations at batch 64 over 15420 training images = 37
epochs, learning rate x0.1 at epoch 24.
The paper reports DTQ above DELTA-Q here as well; no number is reproduced in docs/method.md.
"""

from configs import common


def get_config(arg=None):
  """Returns the config; ``arg`` selects variants (see module docstring)."""
  return common.paper_config(dict(name='image_folder', root='data/256_ObjectCategories', train_per_class=60, test_per_class=20), arg)

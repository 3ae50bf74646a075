"""DTQ on Caltech 256-30 (30 train / 20 test images per class, 257 classes).

Command (ResNet-50, 4-bit weights and activations, DTQ):

  python main.py --config=configs/caltech256_30.py --workdir=runs/caltech256_30

Variants without editing this file: ``configs/caltech256_30.py:mobilenet_v2,5bit``
(network: resnet50 | mobilenet_v2; bits: 2bit .. 5bit | 32bit; method: fp | ft |
l2 | l2sp | delta | dtq; ``quick`` for a few steps on tiny images), and any field
with ``--config.FIELD=VALUE`` (e.g. ``--config.repeats=1`` for one seed
instead of the authors' five).

Data: Caltech-256 as data/256_ObjectCategories/<class>/*.jpg; the split is drawn per class with dataset.data_seed.
Schedule: 9000 iterations at batch 64 over 7710 training images = 75
epochs, learning rate x0.1 at epoch 50.
Expected (authors, 4-bit, best-epoch top-1, 5 runs): ResNet-50 83.5 +- 0.6; MobileNetV2 75.9 +- 1.2 (DELTA-Q: 82.8 +- 0.5 / 74.0 +- 0.7).
"""

from configs import common


def get_config(arg=None):
  """Returns the config; ``arg`` selects variants (see module docstring)."""
  return common.paper_config(dict(name='image_folder', root='data/256_ObjectCategories', train_per_class=30, test_per_class=20), arg)

"""DTQ on MIT Indoors 67 (official split: 80 train / 20 test images per class).

Command (ResNet-50, 4-bit weights and activations, DTQ):

  python main.py --config=configs/mit67.py --workdir=runs/mit67

Variants without editing this file: ``configs/mit67.py:mobilenet_v2,5bit``
(network: resnet50 | mobilenet_v2; bits: 4bit | 5bit | 32bit; method: fp | ft |
l2 | l2sp | delta | dtq; ``quick`` for a few steps on tiny images), and any field
with ``--config.FIELD=VALUE`` (e.g. ``--config.repeats=5``).

Data: MIT Indoors 67 from its official page, arranged as data/mit67/{train,test}/<class>/*.jpg (see README, "Datasets").
Schedule: 9000 iterations at batch 64 over 5360 training images = 107
epochs, learning rate x0.1 at epoch 71.
The paper reports DTQ above DELTA-Q on MIT67 (4-bit); no per-setting number is reproduced in docs/method.md.
"""

from configs import common


def get_config(arg=None):
  """Returns the config; ``arg`` selects variants (see module docstring)."""
  return common.paper_config(dict(name='image_folder', root='data/mit67'), arg)

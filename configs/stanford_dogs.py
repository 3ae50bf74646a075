"""DTQ on Stanford Dogs 120 (official 12000 train / 8580 test).

Command (ResNet-50, 4-bit weights and activations, DTQ):

  python main.py --config=configs/stanford_dogs.py --workdir=runs/stanford_dogs

Variants without editing this file: ``configs/stanford_dogs.py:mobilenet_v2,5bit``
(network: resnet50 | mobilenet_v2; bits: 2bit .. 5bit | 32bit; method: fp | ft |
l2 | l2sp | delta | dtq; ``quick`` for a few steps on tiny images), and any field
with ``--config.FIELD=VALUE`` (e.g. ``--config.repeats=1`` for one seed
instead of the authors' five).

Data: TFDS stanford_dogs (downloaded on first use, or prepared in --config.dataset.data_dir).
Schedule: 9000 iterations at batch 64 over 12000 training images = 48
epochs, learning rate x0.1 at epoch 32.
The paper reports DTQ above DELTA-Q; no number is reproduced in docs/method.md.
DELTA-Q's alpha is 0.1 here, as DELTA's run.sh sets it for Stanford Dogs
(0.01 for the other datasets).
"""

from configs import common


def get_config(arg=None):
  """Returns the config; ``arg`` selects variants (see module docstring)."""
  c = common.paper_config(dict(name='stanford_dogs'), arg)
  c.delta.alpha = 0.1  # DELTA's run.sh: alpha=0.1 for Stanford_Dogs.
  return c

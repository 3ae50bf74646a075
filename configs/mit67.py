"""DTQ on MIT Indoors 67 (official split: 80 train / 20 test images per class).

Command (ResNet-50, 4-bit weights and activations, DTQ):

  python main.py --config=configs/mit67.py --workdir=runs/mit67

Variants without editing this file: ``configs/mit67.py:mobilenet_v2,5bit``
(network: resnet50 | mobilenet_v2; bits: 2bit .. 5bit | 32bit; method: fp | ft |
l2 | l2sp | delta | dtq; ``quick`` for a few steps on tiny images), and any field
with ``--config.FIELD=VALUE`` (e.g. ``--config.repeats=1`` for one seed
instead of the authors' five).

Data: MIT Indoors 67 from its official page, arranged as data/mit67/{train,test}/<class>/*.jpg (see docs/paper_settings.md, "Datasets").
Schedule: 9000 iterations at batch 64 over 5360 training images = 107
epochs, learning rate x0.1 at epoch 71.
Not one of the authors' settings as far as their code shows: their run
configuration (hocon_config/*.hocon) lists Stanford Dogs, Caltech 256-30 and
256-60, CUB-200-2011 and Food-101; only their data loader also accepts
MIT_Indoors_67. No result of theirs is known for it. Its settings are derived,
not published: the shared recipe of configs/common.py (the authors' for the
other datasets: 9000 iterations at batch 64, lr x0.1 at 67%, 5 repeats) on
the official split, and for DELTA-Q the default alpha 0.01 of DELTA's run.sh
(its config/ folder holds channel weights for this dataset, indoorCVPR_09,
but run.sh does not train on it). docs/method.md, "Datasets and splits".
"""

from configs import common


def get_config(arg=None):
  """Returns the config; ``arg`` selects variants (see module docstring)."""
  return common.paper_config(dict(name='image_folder', root='data/mit67'), arg)

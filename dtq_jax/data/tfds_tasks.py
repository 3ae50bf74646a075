"""The paper's TFDS-hosted target tasks and their train/test split names.

Kept free of TensorFlow so that config validation can name the datasets
before anything heavy is imported; ``sources`` reads them.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """How one TFDS dataset maps onto the paper's train/test splits."""
  train_split: str
  test_split: str
  description: str


# The paper's TFDS-hosted target tasks. Food-101 calls its test split
# 'validation'; the others use the official train/test split.
TFDS_DATASETS = {
    'caltech_birds2011': TfdsDataset('train', 'test',
                                     'CUB-200-2011, official 5994 / 5794'),
    'stanford_dogs': TfdsDataset('train', 'test',
                                 'Stanford Dogs 120, official 12000 / 8580'),
    'food101': TfdsDataset('train', 'validation',
                           'Food-101, official 750 / 250 per class'),
}
# Their names, in the order above (the dataset names a config may use).
TFDS_NAMES = tuple(TFDS_DATASETS)

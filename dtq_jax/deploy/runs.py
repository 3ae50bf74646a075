"""Reads a finished run for its export: config, repeats, checkpoint, ranges.

``load_config`` and ``seed_dirs`` find a run's parts, ``restore_run`` its
student and target head as trained, ``calibrate_run`` the static activation
ranges of a run that did not collect them in training,
``learned_export_ranges`` those of a run with learned steps. export.py
builds the export from them; export_check.py compares an export with its
run.
"""

import os

from flax import traverse_util
import ml_collections
import numpy as np

from dtq_jax.infra import files
from dtq_jax.method import learned_params
from dtq_jax.method import networks
from dtq_jax.method import static_ranges
from dtq_jax.run import checkpoints


def load_config(workdir):
  """The run's config (``workdir/config.json``) as a ConfigDict."""
  path = os.path.join(workdir, files.CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: --workdir must be the folder '
                            'of one method (with config.json and seed_N/).')
  return ml_collections.ConfigDict(files.read_json(path))


def seed_dirs(workdir):
  """``{seed: folder}`` of the run's repeats."""
  out = {}
  for name in os.listdir(workdir):
    if name.startswith('seed_') and name[5:].isdigit():
      out[int(name[5:])] = os.path.join(workdir, name)
  return dict(sorted(out.items()))


def restore_run(config, seed_dir, best=False, image_shape=None):
  """A seed's checkpoint and the networks it was trained with.

  Args:
    config: the run's config (``load_config``).
    seed_dir: its ``seed_N`` folder.
    best: the best checkpoint instead of the newest.
    image_shape: (H, W, C) of one image (needed for a user's network).

  Returns:
    ``(nets, variables, head_params, state, step)``: the networks built for
    the checkpoint's class counts, the student backbone's
    ``{'params', 'batch_stats'}``, the target head's parameters, the whole
    restored state (its other collections, e.g. activation ranges) and the
    checkpoint's step.
  """
  state, step = checkpoints.restore_state(seed_dir, best)
  params = state['params']
  head = params['head']
  nets = networks.build_networks(
      config, int(np.asarray(head['fc']['kernel']).shape[-1]),
      networks.source_classes(config, {'params': params['backbone']},
                              image_shape), image_shape)
  variables = {'params': params['backbone'],
               'batch_stats': state['batch_stats']}
  return nets, variables, head, state, step


def dir_bytes(path):
  """Bytes of the files below ``path``."""
  total = 0
  for root, _, names in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in names)
  return total


def load_data(config):
  # Imported lazily: the input pipeline pulls in TensorFlow.
  from dtq_jax.data import datasets  # pylint: disable=g-import-not-at-top
  return datasets.load(config)


def calibrate_run(config, student, variables, num_batches=0, batch_size=0,
                  stat='minmax', data=None):
  """Static ranges from training images (no augmentation, BN in inference).

  Args:
    config: the run config (dataset and preprocessing).
    student: the (dynamic-range) student.
    variables: ``{'params', 'batch_stats'}`` of the student.
    num_batches: batches to use; 0: one pass over the training split.
    batch_size: 0: ``config.eval_batch_size``.
    stat: 'minmax', 'mean' or 'ema' (see static_ranges.calibrate).
    data: preloaded ``datasets.Data``.

  Returns:
    ``(ranges, info)``; ``info`` describes the calibration for the manifest.
  """
  batch_size = batch_size or config.eval_batch_size
  data = data or load_data(config)
  batches = data.eval_batches(data.train, batch_size)
  total = data.num_eval_batches(data.train, batch_size)
  used = min(num_batches, total) if num_batches else total
  ranges = static_ranges.calibrate(student, variables, batches, used, stat)
  return ranges, dict(source='calibration', stat=stat, batches=used,
                      batch_size=batch_size,
                      images=min(used * batch_size, len(data.train)),
                      split='train', augment=False)


def learned_export_ranges(config, variables):
  """The ranges of a run trained with learned quantizer steps (``lsq``).

  Each learned quantizer is the paper's on a fixed range
  (``learned_params.learned_ranges``), so the export formats, which hold
  min-max ranges, carry it as it was trained.

  Args:
    config: the run's config (bits, ``quant.method``).
    variables: the student's ``{'params', 'batch_stats'}`` with its learned
      parameters.

  Returns:
    ``(variables, ranges, weight_ranges)``: the variables without the
    learned parameters, the input ranges as a ``'quant_ranges'`` tree and
    ``{path: (lo, hi)}`` of the kernels.
  """
  bits_w, bits_a = networks.student_bits(config)
  learned = learned_params.learned_ranges(variables['params'], bits_w,
                                          bits_a)
  ranges = traverse_util.unflatten_dict(
      {tuple(path.split('/')) + (end,): value
       for path, r in learned.items() if 'input' in r
       for end, value in zip(('lo', 'hi'), r['input'])})
  weight_ranges = {path: r['weight'] for path, r in learned.items()
                   if 'weight' in r}
  return (dict(variables,
               params=learned_params.without_learned(variables['params'])),
          ranges, weight_ranges)

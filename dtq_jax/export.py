"""`python -m dtq_jax.export`: export a trained student, check an export.

  python -m dtq_jax.export --workdir runs/fmnist/dtq --out model.dtq
  python -m dtq_jax.export --workdir runs/fmnist/dtq --out model.dtq --check
  python -m dtq_jax.export --out model.dtq --check
  python -m dtq_jax.export --workdir runs/fmnist/dtq --format onnx \
      --out model.onnx --check
  python -m dtq_jax.export --workdir runs/own_network/dtq \
      --out model.stablehlo --check

``--workdir`` is the folder of a finished single-method run (``config.json``
and ``seed_N/``, whose ``result.json`` marks it finished; an unfinished one
needs ``--allow_unfinished``); the student of its first seed (``--seed``),
latest checkpoint (``--best``: the best one) is written to ``--out``, as a
``.dtq`` file (the default) or, with ``--format onnx`` (or an ``--out``
ending in ``.onnx``), as an ONNX model (onnx_export.py; for a user's own
network, converted from the predictor's jaxpr by jaxpr_onnx.py, which names
the first operation it cannot translate), or, with ``--format stablehlo`` (or
an ``--out`` ending in ``.stablehlo``), as a portable ``jax.export`` module
for CPU, CUDA and TPU that any network exports to (stablehlo_export.py).
``--check`` runs the exported model on the test set: the integer inference
path (int_inference.py) of a ``.dtq``, onnxruntime for ONNX, the
deserialized module of a ``.stablehlo``; with ``--workdir`` it
also evaluates the checkpoint with fake quantization, static ranges (the
exported ones) and dynamic ranges (the paper's), and reports how often the
top-1 predictions agree (export_check.py). Bad files and runs are one-line
errors (exit 2). The notes of the libraries (orbax's about the checkpoints it
reads, TensorFlow's start-up banners) are hidden unless ``--verbosity`` is
given, as in main.py. ONNX needs the ``onnx`` extra (onnx, onnxruntime).

Using an export from Python::

  manifest, predict = export.load_integer_model('model.dtq')
  logits = predict(images)  # float32 NHWC, as manifest['preprocess'] says
  names = [manifest['class_names'][i] for i in logits.argmax(-1)]
  manifest, predict = export.load_stablehlo('model.stablehlo')  # jax only

The ``.dtq`` file format (and the manifest's fields) is ``dtq_format.py``'s.
"""

import argparse
import logging
import os
import sys

from absl import logging as absl_logging

from dtq_jax.deploy import export as export_lib
from dtq_jax.deploy import export_check
from dtq_jax.deploy import onnx_export
from dtq_jax.deploy import stablehlo_export
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.infra import quiet as quiet_lib
from dtq_jax import layers

TRAIN_EXTRA_HINT = "pip install 'dtq-jax[train]'"

# The public Python API of an export (README: Export).
load_integer_model = export_lib.load_integer_model
load_stablehlo = stablehlo_export.load
integer_predictor = export_lib.integer_predictor


def _import_data(quiet):
  """Imports the data pipeline, which the export and the check read.

  deploy/ imports it lazily (TensorFlow), so that loading an export needs
  only the base install; imported here, once, it can be done quietly.

  Args:
    quiet: hide TensorFlow's start-up banners.

  Raises:
    errors.UserError: the training stack (the ``train`` extra) is missing.
  """
  try:
    with quiet_lib.native_logs_hidden(quiet):
      from dtq_jax.data import datasets  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise errors.UserError(
        f'python -m dtq_jax.export reads the run\'s data and needs '
        f'{e.name or "TensorFlow"}: {TRAIN_EXTRA_HINT}') from e


def _require_extras(args):
  """Fails at once, before any work, when ONNX's extra is missing."""
  if export_lib.output_format(args.out, args.format) != 'onnx':
    return
  if args.workdir is not None:
    onnx_export.require('onnx', 'the ONNX export (--format onnx)')
  if args.check:
    for module in ('onnx', 'onnxruntime'):
      onnx_export.require(module, 'checking an ONNX export')


def main(argv=None):
  """Command line: export a run and/or check an export.

  Args:
    argv: arguments (default ``sys.argv[1:]``).

  Returns:
    Process exit status: 0, or 2 after a one-line error.
  """
  parser = argparse.ArgumentParser(
      prog='python -m dtq_jax.export',
      description='Export a trained DTQ student as packed integer weights '
      '(.dtq), ONNX or a jax.export StableHLO module (--workdir, --out) '
      'and/or evaluate the exported model (--check).')
  parser.add_argument('--workdir', help='folder of a finished single-method '
                      'run (config.json, seed_N/); exports its student')
  parser.add_argument('--out', required=True,
                      help='the .dtq, .onnx or .stablehlo file')
  parser.add_argument('--format', choices=export_lib.FORMATS, default=None,
                      help='dtq (the default), onnx or stablehlo; default: from '
                      'an --out ending in .onnx or .stablehlo')
  parser.add_argument('--check', action='store_true',
                      help='evaluate the exported model on the test set (and '
                      'compare with fake quantization when --workdir is '
                      'given)')
  parser.add_argument('--seed', type=int, default=None,
                      help='which repeat (default: the first)')
  parser.add_argument('--best', action='store_true',
                      help='export the best checkpoint, not the latest')
  parser.add_argument('--allow_unfinished', action='store_true',
                      help='export a run without result.json (its newest '
                      'checkpoint; the manifest records the step)')
  parser.add_argument('--calibration_batches', type=int, default=0,
                      help='training batches for the static ranges (0: the '
                      'whole training split)')
  parser.add_argument('--calibration_batch_size', type=int, default=0,
                      help='0: the config\'s eval_batch_size')
  parser.add_argument('--calibration_stat', default='minmax',
                      choices=layers.RANGE_STATS)
  parser.add_argument('--recalibrate', action='store_true',
                      help='calibrate even if the run collected ranges')
  parser.add_argument('--max_eval_batches', type=int, default=0)
  parser.add_argument('--report', help='write the --check report (JSON) here')
  parser.add_argument('--verbosity', type=int, default=None,
                      help='show the libraries\' logs (orbax, TensorFlow\'s '
                      'banners), absl\'s level N (0: INFO, 1: DEBUG); hidden '
                      'by default')
  args = parser.parse_args(argv)
  if args.workdir is None and not args.check:
    parser.error('give --workdir (export) and/or --check.')
  # Without absl.app, absl's records reach Python's handlers through the
  # 'absl' logger; the filter is this command's only, not its caller's.
  absl_logger = logging.getLogger('absl')
  if args.verbosity is None:
    absl_logger.addFilter(quiet_lib.hide_orbax_notes)
  else:
    absl_logging.set_verbosity(args.verbosity)
  try:
    _require_extras(args)
    _import_data(quiet=args.verbosity is None)
    if args.workdir is not None:
      export_lib.export_run(
          args.workdir, args.out, seed=args.seed, best=args.best,
          calibration_batches=args.calibration_batches,
          calibration_batch_size=args.calibration_batch_size,
          calibration_stat=args.calibration_stat,
          recalibrate=args.recalibrate, fmt=args.format,
          allow_unfinished=args.allow_unfinished)
    if args.check:
      report = export_check.check(args.out, args.workdir,
                                  max_batches=args.max_eval_batches,
                                  fmt=args.format)
      if args.report:
        files.write_json(args.report, report)
  except (errors.UserError, ValueError, OSError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f'error: {first}', file=sys.stderr)
    return 2
  finally:
    absl_logger.removeFilter(quiet_lib.hide_orbax_notes)
  return 0


if __name__ == '__main__':
  sys.exit(main())

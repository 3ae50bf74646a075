"""Checks an exported model: its test accuracy, and agreement with its run.

``check`` runs a ``.dtq`` file through the integer inference path
(int_inference.py) or an ONNX file through onnxruntime on its task's test
set; given the run's folder, it also evaluates the same checkpoint with fake
quantization, with the exported static ranges and with the paper's dynamic
ranges, and reports how often the top-1 predictions agree (a run with
learned steps, ``quant.method='lsq'``, is compared with its student as it
trained: its quantizers have static ranges). A ``.stablehlo``
file runs as the deserialized jax.export module.
``python -m dtq_jax.export ... --check`` calls it.
"""

import os
import time

import ml_collections
import numpy as np

from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import export
from dtq_jax.deploy import onnx_export
from dtq_jax.deploy import runs
from dtq_jax.deploy import stablehlo_export
from dtq_jax import layers
from dtq_jax.method import learned_params
from dtq_jax.method import networks
from dtq_jax.method import static_ranges


def _onnx_predictor(path):
  """``(manifest, predict, ranges)`` of an ONNX export, with onnxruntime."""
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    raise ValueError(f'{path} is a folder, not an ONNX file.')
  try:
    model = onnx.load(path)
    manifest = onnx_export.read_manifest(model)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=['CPUExecutionProvider'])
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # onnx and onnxruntime raise their own types for a damaged file.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f'{path} is not a readable ONNX export: {first}') from e

  def predict(images):
    return session.run([onnx_export.OUTPUT], {
        onnx_export.INPUT: np.asarray(images, np.float32)})[0]

  return manifest, predict, onnx_export.ranges(model)


def check(path, workdir=None, batch_size=0, max_batches=0, data=None,
          verbose=True, fmt=None):
  """Evaluates the exported model ``path`` on its task's test set.

  Args:
    path: the exported model (``.dtq``: the integer path; ONNX:
      onnxruntime; ``.stablehlo``: the deserialized jax.export module).
    workdir: the run it came from; if given, the same checkpoint is also
      evaluated with fake quantization (static ranges as exported, and the
      paper's dynamic ranges) and the top-1 predictions are compared.
    batch_size: 0: the config's eval batch size (dynamic ranges depend on
      it).
    max_batches: stop after this many test batches (0: all).
    data: preloaded ``datasets.Data``.
    verbose: print the report.
    fmt: 'dtq', 'onnx' or 'stablehlo' (None: from the file name).

  Returns:
    A report dict (accuracies in %, agreements as fractions); the exported
    model's entry is ``'int'`` (``.dtq``), ``'onnx'`` or ``'stablehlo'``.
  """
  from dtq_jax.data import datasets  # pylint: disable=g-import-not-at-top
  fmt = export.output_format(path, fmt)
  if fmt == 'onnx':
    key = 'onnx'
    manifest, predict_exported, exported_ranges = _onnx_predictor(path)
  elif fmt == 'stablehlo':
    key = 'stablehlo'
    manifest, predict_exported = stablehlo_export.load(path)
    exported_ranges = stablehlo_export.ranges(manifest)
  else:
    key = 'int'
    manifest, exported = dtq_format.read(path)
    try:
      predict_exported = export.integer_predictor(manifest, exported)
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e
    exported_ranges = exported.get(layers.RANGES, {}).get('backbone', {})
  config = ml_collections.ConfigDict(manifest['config'])
  data = data or datasets.load(config)
  batch_size = batch_size or config.eval_batch_size
  paths = {key: predict_exported}
  if workdir is not None:
    src = manifest['source']
    seeds = runs.seed_dirs(workdir)
    if src['seed'] not in seeds:
      raise ValueError(f'{path} was exported from seed_{src["seed"]}, which '
                       f'{workdir} does not have.')
    nets, fq_vars, head, _, _ = runs.restore_run(
        config, seeds[src['seed']], src['checkpoint'] == 'best',
        data.image_shape)
    dynamic = networks.make_predict(nets.student, nets.head)
    if learned_params.uses_learned_quant(config):
      # Learned steps are static ranges: the reference is the student as
      # it trained, and there is no dynamic-range variant of it.
      paths['static_fake_quant'] = lambda x: dynamic(fq_vars, head, x)
    else:
      static_vars = dict(fq_vars, **{layers.RANGES: exported_ranges})
      static = networks.make_predict(
          static_ranges.with_act_ranges(nets.student, 'static'), nets.head)
      paths['static_fake_quant'] = lambda x: static(static_vars, head, x)
      paths['dynamic_fake_quant'] = lambda x: dynamic(fq_vars, head, x)
  preds = {k: [] for k in paths}
  logits_diff = 0.0
  labels = []
  seconds = {k: 0.0 for k in paths}
  batches = data.eval_batches(data.test, batch_size)
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    mask = batch['mask'].astype(bool)
    out = {}
    for name, fn in paths.items():
      start = time.time()
      out[name] = np.asarray(fn(batch['image']))
      seconds[name] += time.time() - start
      preds[name].append(out[name].argmax(-1)[mask])
    if 'static_fake_quant' in out:
      logits_diff = max(logits_diff, float(np.abs(
          out[key] - out['static_fake_quant'])[mask].max()))
    labels.append(batch['label'][mask])
  labels = np.concatenate(labels)
  preds = {k: np.concatenate(v) for k, v in preds.items()}
  report = dict(model=os.path.abspath(path), format=fmt, exported=key,
                test_images=int(labels.size), batch_size=batch_size,
                sizes=manifest['sizes'], file_bytes=os.path.getsize(path),
                activation_ranges=manifest['activation_ranges'])
  for name, p in preds.items():
    report[name] = dict(accuracy=100.0 * float(np.mean(p == labels)),
                        seconds=seconds[name])
  if workdir is not None:
    report[f'agreement_{key}_vs_static'] = float(
        np.mean(preds[key] == preds['static_fake_quant']))
    if 'dynamic_fake_quant' in preds:
      report['agreement_static_vs_dynamic'] = float(
          np.mean(preds['static_fake_quant'] == preds['dynamic_fake_quant']))
    report[f'max_abs_logit_diff_{key}_vs_static'] = logits_diff
  if verbose:
    print(format_report(report))
  return report


def format_report(report):
  lines = [f'{report["test_images"]} test images '
           f'(batch {report["batch_size"]}):']
  names = {'int': 'integer inference (exported)',
           'onnx': 'ONNX, onnxruntime (exported)',
           'stablehlo': 'StableHLO, jax.export (exported)',
           'static_fake_quant': (
               'fake quant, learned steps' if report['activation_ranges'].get(
                   'source') == 'learned' else 'fake quant, static ranges'),
           'dynamic_fake_quant': 'fake quant, dynamic ranges (paper)'}
  for key, label in names.items():
    if key in report:
      lines.append(f'  {label:38s} top-1 {report[key]["accuracy"]:.2f}%')
  key = report.get('exported', 'int')
  what = {'int': 'integer', 'onnx': 'ONNX', 'stablehlo': 'StableHLO'}[key]
  if f'agreement_{key}_vs_static' in report:
    lines.append(f'  same top-1, {what} vs static fake quant: '
                 f'{100 * report[f"agreement_{key}_vs_static"]:.2f}% '
                 f'(max |logit difference| '
                 f'{report[f"max_abs_logit_diff_{key}_vs_static"]:.2g})')
  if 'agreement_static_vs_dynamic' in report:
    lines.append(f'  same top-1, static vs dynamic fake quant: '
                 f'{100 * report["agreement_static_vs_dynamic"]:.2f}%')
  return '\n'.join(lines)

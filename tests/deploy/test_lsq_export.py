"""Exports of runs trained with learned quantizers (lsq, pact; #27).

A learned quantizer is the paper's on a fixed range, so every format
(.dtq's integer path, ONNX, StableHLO) carries the trained steps and agrees
with the student as it trained; 2- and 3-bit codes pack and run in each,
for the zoo's networks and a user's own.
"""

import numpy as np
import pytest

import commands
from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import export
from dtq_jax.deploy import runs
from dtq_jax import export as export_cli
from dtq_jax import layers
from dtq_jax import learned_quant
from dtq_jax.run import config_validation
from dtq_jax.run import experiment

pytest.importorskip('onnxruntime')

# (variant tokens, per-channel weight steps, model): DTQ at 2 bits with one
# step per kernel; DTQ at 3 bits with one per output channel on a user's own
# network (plain Flax, its nn.Conv layers intercepted); FT-Q at 4 bits with
# PACT's clipping levels.
RUNS = {'dtq2': ('quick,dtq,2bit', False, None),
        'own3': ('quick,dtq,3bit', True, 'examples.networks:VGG'),
        'pact4': ('quick,ft', False, None)}


@pytest.fixture(scope='module', params=sorted(RUNS))
def lsq_run(request, tmp_path_factory, tiny_folder):
  """A finished lsq run of the tiny demo ResNet on random images."""
  root, config = tiny_folder
  variant, per_channel, model = RUNS[request.param]
  c = config(root, variant)
  c.quant.method = 'pact' if request.param.startswith('pact') else 'lsq'
  if model:
    c.model = model
    c.model_kwargs = dict(stage_widths=(4, 8, 8, 8))
  c.quant.per_channel_weights = per_channel
  workdir = str(tmp_path_factory.mktemp(f'lsq_{request.param}'))
  experiment.run(config_validation.validate(c), workdir)
  return workdir, c


@pytest.mark.parametrize('suffix,key', [('dtq', 'int'), ('onnx', 'onnx'),
                                        ('stablehlo', 'stablehlo')])
def test_every_format_agrees_with_the_learned_student(lsq_run, tmp_path,
                                                      suffix, key):
  workdir, config = lsq_run
  report = commands.export_report(workdir, tmp_path / f'model.{suffix}',
                                  tmp_path)
  assert report['activation_ranges'] == {
      'source': 'learned', 'method': config.quant.method}
  assert report['test_images'] == 9
  assert report[f'agreement_{key}_vs_static'] == 1.0
  assert report[f'max_abs_logit_diff_{key}_vs_static'] < 1e-3
  # The reference is the student as it trained: no dynamic-range variant.
  assert 'dynamic_fake_quant' not in report
  assert 'agreement_static_vs_dynamic' not in report


def test_the_export_holds_the_learned_steps_as_ranges(lsq_run, tmp_path):
  workdir, config = lsq_run
  bits = config.bits_w
  out = str(tmp_path / 'model.dtq')
  export.export_run(workdir, out, verbose=False)
  manifest, exported = dtq_format.read(out)
  assert manifest['model']['bits_w'] == manifest['model']['bits_a'] == bits
  # The run's own parameters, read independently of the exporter.
  seeds = runs.seed_dirs(workdir)
  _, variables, _, _, _ = runs.restore_run(config, seeds[min(seeds)],
                                           image_shape=(16, 16, 3))
  params = variables['params']
  convs = manifest['quantized_convs']
  assert convs
  for path, info in convs.items():
    layer = params
    for key in path.split('/'):
      layer = layer[key]
    codes = exported['int_weights']['backbone']
    acts = exported['quant_ranges']['backbone']
    for key in path.split('/'):
      codes, acts = codes[key], acts[key]
    # Weights: [Qn * s, Qp * s] with LSQ's signed levels.
    step = np.maximum(np.abs(np.asarray(layer['lsq_step_w'])),
                      learned_quant.EPS).reshape(-1)
    qn, qp = learned_quant.levels(bits, signed=True)
    np.testing.assert_allclose(codes['lo'].reshape(-1), qn * step, rtol=1e-6)
    np.testing.assert_allclose(codes['hi'].reshape(-1), qp * step, rtol=1e-6)
    assert codes['lo'].size == (info['kernel_shape'][-1]
                                if config.quant.per_channel_weights else 1)
    assert codes['codes'].max() <= 2**bits - 1
    # Inputs: [beta, beta + (2^k - 1) s] (LSQ+), [0, (2^k - 1) s] (LSQ)
    # or [0, alpha] (PACT).
    if layers.ALPHA_A in layer:
      np.testing.assert_allclose(acts['lo'], 0.0)
      np.testing.assert_allclose(acts['hi'], abs(float(layer['pact_alpha_a'])),
                                 rtol=1e-6)
      continue
    s_a = max(abs(float(layer['lsq_step_a'])), learned_quant.EPS)
    beta = float(layer.get('lsq_offset_a', 0.0))
    np.testing.assert_allclose(acts['lo'], beta, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(acts['hi'], beta + (2**bits - 1) * s_a,
                               rtol=1e-6)
  # No learned parameter is stored as a float tensor of the export.
  for name in manifest['checksums']:
    assert name.rsplit('/', 1)[-1] not in layers.LEARNED_PARAMS, name


def test_recalibrating_learned_steps_is_refused_in_one_line(lsq_run, tmp_path,
                                                             capsys):
  workdir, _ = lsq_run
  assert export_cli.main(['--workdir', workdir, '--out',
                          str(tmp_path / 'm.dtq'), '--recalibrate']) == 2
  err = capsys.readouterr().err.strip()
  assert 'learned quantizer steps' in err and '--recalibrate' in err, err
  assert len(err.splitlines()) == 1, err
  assert not (tmp_path / 'm.dtq').exists()

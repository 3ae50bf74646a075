"""benchmarks/op_profile.py's two sides time the same pieces.

Needs torch (``make test-torch`` runs it in .venv-torch, whose interpreter
also sees the main environment's jax).
"""

import sys

import pytest

pytest.importorskip('torch')
pytest.importorskip('torchvision')

from test_op_profile import run_side  # pylint: disable=g-import-not-at-top,wrong-import-position


def _pieces(rec):
  return ({(c['sig'], c['stem'], c['count']) for c in rec['convs']},
          {(tuple(b['shape']), b['count']) for b in rec['bns']},
          {(q['what'], tuple(q['shape']), q['count']) for q in rec['quants']})


@pytest.mark.parametrize('model', ['resnet18', 'mobilenet_v2'])
def test_both_sides_time_the_same_pieces(model, tmp_path):
  jax_rec = run_side(sys.executable, 'jax', tmp_path, model=model)
  torch_rec = run_side(sys.executable, 'torch', tmp_path, model=model,
                       steps=1 if model == 'resnet18' else 0)
  # The same convolutions (depthwise ones included), BatchNorms and
  # quantized tensors, shape by shape: the two networks are the same.
  assert _pieces(jax_rec) == _pieces(torch_rec)
  if model == 'resnet18':
    assert torch_rec['step_ms'] > 0

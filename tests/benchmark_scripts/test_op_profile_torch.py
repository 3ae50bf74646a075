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


def test_both_sides_time_the_same_pieces_of_resnet18(tmp_path):
  jax_rec = run_side(sys.executable, 'jax', tmp_path)
  torch_rec = run_side(sys.executable, 'torch', tmp_path, steps=1)
  # The same convolutions, BatchNorms and quantized tensors, shape by shape:
  # the two networks are the same ResNet-18.
  assert _pieces(jax_rec) == _pieces(torch_rec)
  assert torch_rec['step_ms'] > 0

"""Your own Flax classifier: FT-Q and DTQ on the demo's Fashion-MNIST task.

The network is one of examples/networks.py, plain Flax written without
dtq_jax, named by import path (``model='examples.networks:VGG'``); everything
else is the offline demo's in-domain setting (configs/fmnist.py): the
teacher is the same network trained at full precision on 3000 images per
class, the student learns the ten classes from 30 labelled images per class,
4-bit weights and activations. Command:

  python main.py --config=configs/own_network.py --workdir=runs/own_network

Variants (``configs/own_network.py:efficientnet,quick``): the network,
``vgg`` (default), ``efficientnet`` or ``convnext``; ``quick`` (a few steps);
the split and method tokens of configs/fmnist.py. With a network of your own,
copy this file and set ``model``, ``model_kwargs`` and, if the automatic
choice does not suit, ``dtq.taps`` and ``dtq.source_classifier``
(docs/own_network.md).

Expected (final test accuracy %, 30 shots, 4/4 bits, mean ± std over 3
seeds, AMD EPYC, 2 cores; about 10 s (VGG) to 100 s (EfficientNet-like) per
run): VGG FT-Q 83.45 ± 0.32, DTQ 84.04 ± 0.04; EfficientNet-like FT-Q
79.88 ± 0.15, DTQ 80.79 ± 0.15; ConvNeXt-like FT-Q 81.37 ± 0.18, DTQ
81.44 ± 0.18. The tables (results/own_network_{vgg,efficientnet,convnext}.md)
are written by ``python benchmarks/compare.py --sweep=shots --shots=30
--config=configs/own_network.py:vgg --methods=ft,dtq --seeds=3
--out=results/own_network_vgg.md`` (and likewise for the other two).
"""

import ml_collections

from configs import common
from configs import fmnist

# The networks of examples/networks.py, by config variant.
NETWORKS = {'vgg': 'examples.networks:VGG',
            'efficientnet': 'examples.networks:EfficientNetLike',
            'convnext': 'examples.networks:ConvNeXtLike'}


def get_config(arg=None):
  """Returns the config; ``arg`` names the network and fmnist's variants."""
  tokens = common.parse_variant(arg, extra=tuple(NETWORKS) + fmnist.SPLITS)
  chosen = [t for t in tokens if t in NETWORKS]
  if len(chosen) > 1:
    raise ValueError(f'config variants {" and ".join(sorted(chosen))} '
                     'exclude each other; choose one network.')
  c = fmnist.get_config(','.join(sorted(t for t in tokens
                                        if t not in NETWORKS)))
  c.model = NETWORKS[chosen[0] if chosen else 'vgg']
  # The class's own defaults (sized for 28x28 grayscale images); a field
  # set here is passed to the class as it is.
  c.model_kwargs = ml_collections.ConfigDict()
  c.compare_methods = ('ft', 'dtq')
  return c

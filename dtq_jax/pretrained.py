"""`python -m dtq_jax.pretrained`: convert a torchvision checkpoint, report it.

  python -m dtq_jax.pretrained --model resnet50 --from resnet50.pth \\
      --to converted/
  python -m dtq_jax.pretrained --model mobilenet_v2 --from torchvision

The conversion, the published checkpoints and the report are
dtq_jax.weights.pretrained's; this module is the command's stable name.
"""

import sys

from dtq_jax.weights.pretrained import main

if __name__ == '__main__':
  sys.exit(main())

"""The DTQ train step in PyTorch eager mode: the reference for train_step.py.

Written from docs/method.md on torchvision's ResNet / MobileNetV2 with
random weights (no download):

* teacher: the full-precision network, frozen, eval mode (BatchNorm running
  statistics, calibrated on the benchmark batch since the weights are
  random), run under ``torch.no_grad``;
* student: a copy whose convolutions, all but the stem, fake-quantize their
  weight and their input with the min-max quantizer (per tensor, range
  recomputed every call, round with a straight-through gradient, min and max
  kept in the autograd graph, clip with the identity gradient), trained
  (BatchNorm in training mode); its source classifier stays full precision
  and frozen, a new target classifier is trained;
* 4 tapped maps through forward hooks (ResNet: ``layerX[-1].conv3`` outputs,
  ``conv2`` for basic-block ResNets; MobileNetV2: ``features[5/9/13/17]
  .conv[-1]``, the projection BatchNorm);
* one attention module per map on the teacher's map: Linear(H*W, H, no bias),
  ReLU, Linear(H, 1, no bias), + bias(C), softmax over C;
* loss CE + 0.5 * KL (T = 60 ResNet, 30 MobileNetV2, over the source classes
  through the frozen classifier) + 0.01 * AFA (the 'final' normalisation);
* SGD, momentum 0.9, lr 0.01 on the student (frozen classifier excluded), the
  target classifier (weight decay 1e-4) and the attention modules.

Variants (``--variants``): ``dtq`` (DTQ at --bits), ``dtq32`` (the same step,
student at 32/32 bits), ``ft`` (FT-Q at --bits: CE only, no teacher). One JSON
line per variant with the same fields as train_step.py (``compile_s`` is null:
eager mode compiles nothing), FLOPs counted by ``torch.utils.flop_counter``
over one whole step (convolutions and matrix products only), then a Markdown
table; ``--out`` writes it with the command, commit and machine.

Runs in the torch virtual environment (see requirements-torch.txt):

  .venv-torch/bin/python benchmarks/torch_reference.py --model=resnet50 \
      --batch=16 --steps=3
"""

import argparse
import copy
import gc
import math
import sys
import time

import bench_util

import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch import nn  # pylint: disable=wrong-import-position
import torch.nn.functional as F  # pylint: disable=wrong-import-position
import torchvision  # pylint: disable=wrong-import-position
from torch.utils import flop_counter  # pylint: disable=wrong-import-position

VARIANTS = ('dtq', 'dtq32', 'ft')
MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
          'mobilenet_v2')
TEMPERATURE = {'mobilenet_v2': 30.0}  # ResNets: 60
MOBILENET_TAPS = (5, 9, 13, 17)
FULL_PRECISION = 32


# ---------------------------------------------------------------------------
# Quantizer (docs/method.md, "The quantizer").


class RoundClamp(torch.autograd.Function):
  """round(clamp(u, 0, levels)) forward, identity backward (straight-through).

  The authors' one clamp and their rounding as one autograd Function: with
  ``u = (x - lo) / s`` the clamp to [0, levels] is their clip of ``x`` to
  [lo, hi], a no-op on the tensor's own range, and like their framework's
  clip it passes the identity gradient to every element, the min and max
  included. (PyTorch 2's ``torch.clamp`` no longer does: with scalar bounds
  it gives the bounds' elements no gradient, with tensor bounds half.)
  """

  @staticmethod
  def forward(ctx, u, levels):  # pylint: disable=arguments-differ
    del ctx
    return torch.clamp(u, 0, levels).round_()

  @staticmethod
  def backward(ctx, grad):  # pylint: disable=arguments-differ
    del ctx
    return grad, None


def fake_quant(x, bits):
  """Min-max asymmetric uniform fake quantization of the whole tensor.

  The authors' step: lo and hi by min/max in the autograd graph (ties share
  their gradient evenly), s = (hi - lo) / (2**bits - 1), round(clamp(...))
  with the identity gradient, then back to floats; the gradient docs/method.md
  specifies follows by autograd. A constant tensor (s = 0) divides by 1
  instead, so q = lo = x with the identity gradient, as
  ``dtq_jax.quant.fake_quant`` returns it (a scalar ``where``, no extra pass
  over the tensor).
  """
  if bits == FULL_PRECISION:
    return x
  levels = 2**bits - 1
  lo = torch.amin(x)
  hi = torch.amax(x)
  scale = (hi - lo) / levels
  scale = torch.where(scale > 0, scale, 1.0)
  return RoundClamp.apply((x - lo) / scale, levels) * scale + lo


class QuantConv2d(nn.Conv2d):
  """nn.Conv2d whose weight and input are fake-quantized on every call."""
  bits_w = FULL_PRECISION
  bits_a = FULL_PRECISION

  def forward(self, x):
    return self._conv_forward(fake_quant(x, self.bits_a),
                              fake_quant(self.weight, self.bits_w), self.bias)


def quantize_convs(model, stem, bits_w, bits_a):
  """Turns every nn.Conv2d of ``model`` except ``stem`` into a QuantConv2d."""
  count = 0
  for module in model.modules():
    if type(module) is nn.Conv2d and module is not stem:  # pylint: disable=unidiomatic-typecheck
      module.__class__ = QuantConv2d
      module.bits_w, module.bits_a = bits_w, bits_a
      count += 1
  return count


# ---------------------------------------------------------------------------
# Networks.


def create(model_name, num_source_classes):
  """Random-init torchvision network, its stem, tapped modules, classifier."""
  if model_name == 'mobilenet_v2':
    net = torchvision.models.mobilenet_v2(weights=None,
                                          num_classes=num_source_classes)
    stem = net.features[0][0]
    taps = [net.features[i].conv[-1] for i in MOBILENET_TAPS]
    return net, stem, taps
  net = getattr(torchvision.models, model_name)(weights=None,
                                                num_classes=num_source_classes)
  stem = net.conv1
  last = 'conv3' if isinstance(net.layer1[-1],
                               torchvision.models.resnet.Bottleneck) else 'conv2'
  taps = [getattr(getattr(net, f'layer{i}')[-1], last) for i in range(1, 5)]
  return net, stem, taps


def split_classifier(net, model_name):
  """Replaces the source classifier by Identity; returns (dropout, fc)."""
  if model_name == 'mobilenet_v2':
    dropout, fc = net.classifier[0], net.classifier[1]
    net.classifier = nn.Identity()
    return dropout, fc
  fc = net.fc
  net.fc = nn.Identity()
  return nn.Identity(), fc


class Taps:
  """Collects the outputs of the tapped modules during one forward pass."""

  def __init__(self, modules):
    self.maps = []
    self.handles = [m.register_forward_hook(self._hook) for m in modules]

  def _hook(self, module, inputs, output):
    del module, inputs
    self.maps.append(output)

  def take(self):
    maps, self.maps = self.maps, []
    return maps


class ChannelAttention(nn.Module):
  """a = softmax(Linear(H,1)(relu(Linear(H*W,H)(F))) + b, over C)."""

  def __init__(self, channels, height, width):
    super().__init__()
    self.fc1 = nn.Linear(height * width, height, bias=False)
    self.fc2 = nn.Linear(height, 1, bias=False)
    self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, teacher_map):
    b, c, h, w = teacher_map.shape
    z = teacher_map.detach().reshape(b, c, h * w)
    z = self.fc2(F.relu(self.fc1(z))).squeeze(-1)
    return F.softmax(z + self.bias, dim=-1)


def kl_loss(student_logits, teacher_logits, t):
  log_p_s = F.log_softmax(teacher_logits.detach() / t, dim=-1)
  log_p_t = F.log_softmax(student_logits / t, dim=-1)
  return t * t * torch.sum(log_p_s.exp() * (log_p_s - log_p_t)) / (
      student_logits.shape[0])


def afa_loss(teacher_maps, student_maps, weights):
  total = 0.0
  for fs, ft, a in zip(teacher_maps, student_maps, weights):
    b, c = ft.shape[:2]
    d2 = torch.sum(torch.square(ft - fs.detach()), dim=(2, 3))
    total = total + 0.5 * c * torch.sum(a * d2) / b
  return total


class DTQStep:
  """Networks, optimizer and one training step of one variant."""

  def __init__(self, args, model_name, method, bits, teacher_state, device):
    self.method = method
    self.dtype = args.dtype
    self.device = device
    num_source = args.num_source_classes
    teacher, _, teacher_taps = create(model_name, num_source)
    teacher.load_state_dict(teacher_state)
    student, stem, student_taps = create(model_name, num_source)
    student.load_state_dict(teacher_state)
    self.num_quantized = 0
    if bits != (FULL_PRECISION, FULL_PRECISION):
      self.num_quantized = quantize_convs(student, stem, *bits)
    self.dropout, self.source_fc = split_classifier(student, model_name)
    for p in self.source_fc.parameters():
      p.requires_grad_(False)
    self.student = student.to(device).train()
    self.source_fc.to(device)
    self.dropout.to(device)
    self.head_dropout = copy.deepcopy(self.dropout).to(device).train()
    self.dropout.train()
    feat_dim = self.source_fc.in_features
    self.head = nn.Linear(feat_dim, args.num_classes).to(device)
    self.student_taps = Taps(student_taps)
    self.temperature = TEMPERATURE.get(model_name, 60.0)
    groups = [{'params': [p for p in student.parameters() if p.requires_grad],
               'weight_decay': 0.0},
              {'params': list(self.head.parameters()), 'weight_decay': 1e-4}]
    self.teacher = None
    if method == 'dtq':
      self.teacher = teacher.to(device).eval()
      for p in self.teacher.parameters():
        p.requires_grad_(False)
      self.teacher_taps = Taps(teacher_taps)
      # Map shapes from one forward pass of the teacher.
      with torch.no_grad():
        self.teacher(torch.zeros(1, 3, args.image_size, args.image_size,
                                 device=device))
      shapes = [m.shape[1:] for m in self.teacher_taps.take()]
      self.attention = nn.ModuleList(
          ChannelAttention(c, h, w) for c, h, w in shapes).to(device)
      groups.append({'params': list(self.attention.parameters()),
                     'weight_decay': 0.0})
    else:
      del teacher
    self.optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)

  def _autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16,
                          enabled=self.dtype == 'bfloat16')

  def step(self, images, labels):
    """One update; returns the loss tensor (not synchronised)."""
    with self._autocast():
      pooled = self.student(images)
      student_maps = self.student_taps.take()
      logits = self.head(self.head_dropout(pooled))
      loss = F.cross_entropy(logits.float(), labels)
      if self.method == 'dtq':
        with torch.no_grad():
          teacher_logits = self.teacher(images)
        teacher_maps = self.teacher_taps.take()
        source_logits = self.source_fc(self.dropout(pooled))
        weights = [att(m.float()) for att, m in zip(self.attention,
                                                    teacher_maps)]
        loss = loss + 0.5 * kl_loss(source_logits.float(),
                                    teacher_logits.float(), self.temperature)
        loss = loss + 0.01 * afa_loss(
            [m.float() for m in teacher_maps],
            [m.float() for m in student_maps], weights)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss


# ---------------------------------------------------------------------------
# Benchmark.


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  # PyTorch as its users run it: glibc's malloc left alone (--allocator=keep
  # gives it the allocator setting of dtq-jax's main.py).
  bench_util.add_step_args(p, MODELS, VARIANTS, allocator='default')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='bfloat16: torch.autocast')
  p.add_argument('--threads', type=int, default=bench_util.usable_cores(),
                 help='torch.set_num_threads (default: all usable cores, '
                 'as XLA:CPU uses)')
  p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
  p.add_argument('--num_classes', type=int, default=257)
  p.add_argument('--num_source_classes', type=int, default=1000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no_flops', action='store_true',
                 help='skip the FLOP count (one extra step per variant)')
  p.add_argument('--out', default=None, help='Markdown report path')
  args = p.parse_args(argv)
  bench_util.check_model_variant_args(p, args, MODELS, VARIANTS)
  args.allocator = bench_util.configure_allocator(args.allocator)
  return args


def random_batch(args):
  """The benchmark's batch: standard-normal images, random labels."""
  g = torch.Generator().manual_seed(args.seed)
  images = torch.randn(args.batch, 3, args.image_size, args.image_size,
                       generator=g)
  labels = torch.randint(0, args.num_classes, (args.batch,), generator=g)
  return images, labels


def calibrated_teacher_state(model_name, num_source_classes, images):
  """Random teacher weights with BatchNorm statistics of ``images``.

  A random network in eval mode with the initial running statistics (0, 1)
  normalises nothing and its maps and logits blow up (the KL/AFA terms
  overflow); one training-mode pass with a cumulative average (momentum
  None) sets every running statistic to the batch's, as a pretrained
  teacher's would roughly be.
  """
  net = create(model_name, num_source_classes)[0]
  bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # pylint: disable=protected-access
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None
  net.train()
  with torch.no_grad():
    net(images)
  for bn in bns:
    bn.momentum = 0.1
  return net.state_dict()


class Variant:
  """One variant's step plus its timings."""

  def __init__(self, args, model, name, method, bits, teacher_state, batch,
               device):
    self.args, self.model, self.name, self.method, self.bits = (
        args, model, name, method, bits)
    self.device = device
    torch.manual_seed(args.seed)
    self.dtq = DTQStep(args, model, method, bits, teacher_state, device)
    self.images = batch[0].to(device)
    self.labels = batch[1].to(device)
    self.intervals, self.timed_s, self.timed_steps = [], 0.0, 0
    self.first_s, self.flops, self.loss = None, None, None

  def sync(self):
    if self.device.type == 'cuda':
      torch.cuda.synchronize()

  def warm_up(self):
    t = time.perf_counter()
    self.dtq.step(self.images, self.labels)
    self.sync()
    self.first_s = time.perf_counter() - t
    for _ in range(max(self.args.warmup - 1, 0)):
      self.dtq.step(self.images, self.labels)
    self.sync()
    if not self.args.no_flops:
      counter = flop_counter.FlopCounterMode(display=False)
      with counter:
        self.dtq.step(self.images, self.labels)
      self.flops = counter.get_total_flops()

  def time_steps(self, steps):
    start = last = time.perf_counter()
    for _ in range(steps):
      loss = self.dtq.step(self.images, self.labels)
      if self.device.type == 'cuda':
        self.sync()
      now = time.perf_counter()
      self.intervals.append(now - last)
      last = now
    self.sync()
    self.timed_s += time.perf_counter() - start
    self.timed_steps += steps
    self.loss = float(loss.detach())

  def record(self):
    args = self.args
    step_s = bench_util.median(self.intervals)
    flops = float(self.flops) if self.flops is not None else float('nan')
    rec = {
        'model': self.model,
        'variant': self.name,
        'method': self.method,
        'bits_w': self.bits[0],
        'bits_a': self.bits[1],
        # train_step.py's quant switches (SWITCHES): not applicable here.
        'pointwise_as_dot': None,
        'depthwise_as_shifts': None,
        'fused_vjp': None,
        'batch': args.batch,
        'image_size': args.image_size,
        'dtype': args.dtype,
        'backend': f'torch-eager-{self.device.type}',
        'threads': torch.get_num_threads(),
        'quantized_convs': self.dtq.num_quantized,
        'steps': self.timed_steps,
        'img_per_s': round(args.batch * self.timed_steps / self.timed_s, 3),
        'step_ms': round(step_s * 1e3, 2),
        'step_ms_min': round(min(self.intervals) * 1e3, 2),
        'step_ms_max': round(max(self.intervals) * 1e3, 2),
        'first_step_s': round(self.first_s, 3),
        'compile_s': None,
        'gflop_per_step': round(flops / 1e9, 2),
        'gflop_per_image': round(flops / 1e9 / args.batch, 3),
        'gflop_per_s': round(flops / 1e9 / step_s, 1),
        'loss': self.loss,
        'finite': math.isfinite(self.loss),
    }
    if self.device.type == 'cuda':
      rec['mem_peak_mb'] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return rec


COLUMNS = [
    ('model', 'model'),
    ('variant', 'variant'),
    ('img/s', 'img_per_s'),
    ('step ms (median)', 'step_ms'),
    ('x time of first variant', 'time_ratio'),
    ('first step s', 'first_step_s'),
    ('GFLOP/step (conv+matmul)', 'gflop_per_step'),
    ('GFLOP/s', 'gflop_per_s'),
]


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(args.threads)
  if args.device == 'cuda' and not torch.cuda.is_available():
    sys.exit('--device cuda: no CUDA device')
  device = torch.device(args.device)
  info = bench_util.machine_info(
      torch=torch.__version__, torchvision=torchvision.__version__,
      torch_threads=torch.get_num_threads(),
      mkldnn=torch.backends.mkldnn.is_available(), device=args.device,
      device_name=(torch.cuda.get_device_name() if args.device == 'cuda'
                   else 'cpu'), allocator=args.allocator)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  records = []
  for model in args.model:
    torch.manual_seed(args.seed + 1)
    batch = random_batch(args)
    teacher_state = calibrated_teacher_state(model, args.num_source_classes,
                                             batch[0])
    variants = []
    for v in args.variants:
      method = 'ft' if v == 'ft' else 'dtq'
      bits = (32, 32) if v == 'dtq32' else args.bits
      name = f'{method}_w{bits[0]}a{bits[1]}'
      print(f'# {model} {name}: building and warming up ...', file=sys.stderr,
            flush=True)
      var = Variant(args, model, name, method, bits, teacher_state, batch,
                    device)
      var.warm_up()
      variants.append(var)
    loads = bench_util.time_rounds(model, variants, args.rounds, args.steps,
                                   args.take_turns)
    first = None
    for var in variants:
      rec = var.record()
      rec['load_per_round'] = loads
      first = first or rec
      rec['time_ratio'] = round(rec['step_ms'] / first['step_ms'], 3)
      records.append(rec)
      bench_util.emit(rec)
    del variants
    gc.collect()

  table = bench_util.markdown_table(records, COLUMNS)
  notes = []
  by_model = {}
  for r in records:
    by_model.setdefault(r['model'], {})[r['method'] + str(r['bits_w'])] = r
  for model, rs in by_model.items():
    q = [r for k, r in rs.items() if k.startswith('dtq') and k != 'dtq32']
    if q and 'dtq32' in rs:
      notes.append(f'- {model}: quantization costs x'
                   f'{q[0]["step_ms"] / rs["dtq32"]["step_ms"]:.2f}')
    ft = [r for k, r in rs.items() if k.startswith('ft')]
    if q and ft:
      notes.append(f'- {model}: teacher + transfer terms cost x'
                   f'{q[0]["step_ms"] / ft[0]["step_ms"]:.2f}')
  notes.append('\nstep ms: median of the per-step wall times (eager steps '
               'are synchronous on CPU); img/s: batch x steps / wall time; '
               'GFLOP: torch.utils.flop_counter over one whole step '
               '(convolutions and matrix products; elementwise ops such as '
               'the fake quantization are not counted). The counter charges a '
               'depthwise convolution\'s backward as if it were dense (C times '
               'its real cost), so MobileNetV2\'s GFLOP and GFLOP/s are '
               'inflated about 5x; its forward count (0.60 GFLOP per 224 px '
               'image) is right.')
  print()
  print(table)
  print('\n'.join(notes))
  if args.out:
    bench_util.write_report(
        args.out, f'DTQ train step, PyTorch eager reference '
        f'({", ".join(args.model)}, batch {args.batch}, {args.dtype}, bits '
        f'{args.bits[0]}/{args.bits[1]})', info, table, records, notes)


if __name__ == '__main__':
  main()

"""The training loop of one run: steps, evaluations, checkpoints, stops.

``train_and_evaluate`` trains one student for one seed and resumes a run that
stopped. The step itself (``step.py``) is pure and jitted once; this loop
only feeds it batches, and reads the step's metrics back at log, evaluation
and checkpoint points, so it never waits for the device between them.
"""

import contextlib
import functools
import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dtq_jax.data import augment
from dtq_jax.infra import files
from dtq_jax.method import learned_params
from dtq_jax.method import networks
from dtq_jax.method import step as step_lib
from dtq_jax.run import checkpoints
from dtq_jax.run import run_result
from dtq_jax.run import runtime as runtime_lib


class Interrupted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of the current step was written."""

  def __init__(self, message, signum):
    super().__init__(message)
    self.signum = signum


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

  The step in flight finishes and is checkpointed. A second SIGINT aborts at
  once (Python's default KeyboardInterrupt). Handlers are only installed from
  the main thread (signal's rule) and are restored on exit.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    # The next SIGINT interrupts immediately.
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def agreed(self):
    """The signal to stop on, as every process sees it, or None.

    A process stops only when all do: alone it would leave the others
    waiting in the next step's collectives (or the checkpoint's barriers)
    forever. With several processes this is a collective over all of them,
    so call it at the same steps everywhere; a process that was not
    signalled stops with SIGTERM's code.

    Returns:
      A signal number or None.
    """
    if jax.process_count() == 1:
      return self.signum
    flags = multihost_utils.process_allgather(
        np.int32(self.signum or 0))
    if not np.any(flags):
      return None
    return self.signum or signal.SIGTERM

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def schedule_lengths(config, data):
  """Steps per epoch, epochs and total steps of a run.

  The paper fixes 9000 iterations at batch 64 and converts them into whole
  epochs: ``epochs = round(total_steps * batch_size / N_train)``.

  Args:
    config: the run config.
    data: the run's ``datasets.Data``.

  Returns:
    ``(steps_per_epoch, num_epochs, total_steps)``.
  """
  # Every step sees a full batch (one compiled shape), so an epoch is
  # floor(N / B) steps; the remainder differs from epoch to epoch.
  steps_per_epoch = config.steps_per_epoch or data.steps_per_epoch(
      config.batch_size)
  num_epochs = config.num_epochs or max(
      1, round(config.total_steps * config.batch_size / data.num_train))
  return steps_per_epoch, num_epochs, steps_per_epoch * num_epochs


def evaluate(eval_step, params, batch_stats, split, config, data, runtime,
             quant_ranges=None):
  """Accuracy (%) and mean CE on every example of ``split`` exactly once.

  Args:
    eval_step: a jitted ``step.make_eval_step``.
    params: trainable parameters.
    batch_stats: the student's BatchNorm statistics.
    split: one of ``data``'s splits.
    config: the run config (``eval_batch_size``, ``max_eval_batches``).
    data: the run's ``datasets.Data``.
    runtime: the run's ``runtime.Runtime``.
    quant_ranges: the ranges a static-range step quantizes with.

  Returns:
    ``{'accuracy', 'loss', 'count'}``.
  """
  totals = None
  batches = data.eval_batches(split, config.eval_batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(),
                              on_device=data.on_device)
  extra = () if quant_ranges is None else (quant_ranges,)
  for i, batch in enumerate(batches):
    if config.max_eval_batches and i >= config.max_eval_batches:
      break
    out = eval_step(params, batch_stats, runtime.put_batch(batch), *extra)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {'accuracy': 100.0 * float(totals['correct']) / count,
          'loss': float(totals['loss']) / count, 'count': int(totals['count'])}


class _Run:
  """One run's state, steps, logs and checkpoints, as the loop uses them.

  Attributes:
    state: the (replicated) TrainState.
    meta: ``{'history', 'best_accuracy', 'wall_time_s'}``, checkpointed.
  """

  def __init__(self, config, workdir, seed, data, teacher, delta_weights,
               advice):
    self.config, self.workdir, self.seed, self.data = (config, workdir, seed,
                                                       data)
    self.advice = advice
    self.runtime = runtime_lib.Runtime(
        compiler_options=runtime_lib.compiler_options(config))
    self.nets = networks.build_networks(
        config, data.num_classes,
        networks.source_classes(config, teacher, data.image_shape),
        data.image_shape)
    self.steps_per_epoch, self.num_epochs, self.total_steps = (
        schedule_lengths(config, data))
    init_rng, self.state_rng = jax.random.split(jax.random.PRNGKey(seed))
    params, batch_stats = networks.init_params(self.nets, init_rng,
                                               data.image_shape, teacher)
    self.learned_quant = learned_params.uses_learned_quant(config)
    if self.learned_quant:
      # The structure only (the probe): restore fills the values, or
      # start_learned_quant when there is nothing to restore.
      params['backbone'] = learned_params.learned_quant_template(
          self.nets.student, {'params': params['backbone'],
                              'batch_stats': batch_stats},
          self._first_images(), self.state_rng)
    self.tx, self.schedule = step_lib.make_optimizer(
        config, params, self.nets.student.classifier_name,
        self.steps_per_epoch, self.num_epochs)
    self._set_initial_state(params, batch_stats)
    self.frozen = self.runtime.replicate({'teacher': teacher,
                                          'delta_weights': delta_weights})
    self.meta = {'history': [], 'best_accuracy': -1.0, 'wall_time_s': 0.0}
    self.latest = checkpoints.manager(
        os.path.join(workdir, checkpoints.LATEST),
        max_to_keep=config.keep_checkpoints)
    self.best = checkpoints.manager(os.path.join(workdir, checkpoints.BEST),
                                    max_to_keep=1, barrier_prefix='best')
    self.train_step = self.runtime.jit_train_step(
        step_lib.make_train_step(config, self.nets, self.tx))
    self.eval_step = self.runtime.jit(
        step_lib.make_eval_step(
            self.nets, dataset=config.dataset,
            stats_group_size=config.get('stats_group_size', 0)),
        out_shardings=self.runtime.replicated)
    self.static_eval_step = self.runtime.jit(
        step_lib.make_eval_step(self.nets, 'static', config.dataset),
        out_shardings=self.runtime.replicated)
    self.logger = None
    self.bar = None

  def _set_initial_state(self, params, batch_stats):
    """The state before the first step, from ``params`` (replicated)."""
    self.state = self.runtime.replicate(step_lib.create_train_state(
        self.config, self.nets, params, batch_stats, self.tx, self.state_rng,
        self.data.image_shape))

  def _first_images(self):
    """The first training batch's images, as the first step feeds them.

    The global batch (every process computes the same starts from it),
    augmented on the device with the first step's key when the step does
    that itself.
    """
    batch = next(self.data.train_batches(
        self.config.batch_size, seed=self.seed, start_step=0,
        on_device=self.data.on_device))
    _, step_rng = jax.random.split(self.state_rng)
    return augment.step_inputs(jnp.asarray(batch['image']),
                               self.config.get('dataset'), step_rng)

  def start_learned_quant(self):
    """Starts the learned quantizers from the pretrained weights and the
    first training batch (a run's first invocation only)."""
    state = jax.device_get(self.state)
    started = learned_params.init_learned_quant(
        self.nets.student, {'params': state.params['backbone'],
                            'batch_stats': state.batch_stats},
        self._first_images(), self.state_rng)
    params = dict(state.params, backbone=started['params'])
    self._set_initial_state(params, state.batch_stats)

  def restore(self):
    """Continues from the newest intact checkpoint, if there is one."""
    restored = checkpoints.restore_latest_good(self.latest, self.state)
    if restored is not None:
      self.state, self.meta = restored.state, restored.meta
      print(f'Resuming {self.workdir} at step {int(self.state.step)}.')
    elif self.learned_quant:
      self.start_learned_quant()
    return int(self.state.step)

  def open_logs(self, start_step):
    """Opens the metrics log and the progress bar (process 0 only)."""
    main = self.runtime.is_main
    self.logger = files.MetricsLog(self.workdir, main, start_step)
    self.bar = ProgressBar(total=self.total_steps, initial=start_step,
                           disable=not main, dynamic_ncols=True,
                           mininterval=2.0,
                           desc=os.path.basename(self.workdir.rstrip('/')))

  def restart_clock(self):
    """Times the bar's rate and ETA from now on.

    Called after the first step of an invocation: it compiled the step (tens
    of seconds), which the remaining steps do not repeat.
    """
    self.bar.restart_clock()

  def close_logs(self):
    self.bar.close()
    self.logger.close()

  def train_batches(self, start_step):
    """The training batches from ``start_step`` on, already on the devices
    (``config.prefetch_batches`` transferred ahead)."""
    return self.runtime.prefetch(
        self.data.train_batches(
            self.config.batch_size, seed=self.seed, start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            on_device=self.data.on_device),
        self.config.get('prefetch_batches', 1))

  def train(self, batch):
    """Enqueues one step on a device batch; returns its metrics (still on
    the device)."""
    self.state, metrics = self.train_step(self.state, batch, self.frozen)
    self.bar.update(1)
    return metrics

  def nonfinite_steps(self):
    return int(jax.device_get(self.state.nonfinite_steps))

  def fetch_checked(self, pending):
    """Fetches pending step metrics; stops at a non-finite loss if asked."""
    history = [(s, jax.device_get(m)) for s, m in pending]
    bad = run_result.first_nonfinite(history)
    if bad is not None and self.config.on_nonfinite == 'stop':
      saved = self.latest.latest_step()
      kept = (f'the checkpoint of step {saved} in {self.workdir}/'
              f'{checkpoints.LATEST} is from before it' if saved is not None
              else 'no checkpoint was written before it')
      raise run_result.NonFiniteLossError(
          f'non-finite {", ".join(bad[1])} at step {bad[0]}; {kept}. '
          f'{self.advice}')
    if bad is not None:
      skipped = [s for s, m in history if not m['finite']]
      self.bar.write(
          f'warning: skipped {len(skipped)} update(s) with a non-finite loss '
          f'or gradient (first: step {bad[0]}, {", ".join(bad[1])}); '
          f'{self.nonfinite_steps()} skipped so far.')
    return history

  def log_train(self, step, history, seconds):
    """Logs the mean of each metric over the steps since the last log."""
    scalars = {k: np.mean([m[k] for _, m in history]) for k in history[0][1]}
    scalars.pop('finite')
    scalars['lr'] = float(self.schedule(step - 1))
    scalars['images_per_s'] = len(history) * self.config.batch_size / max(
        seconds, 1e-9)
    scalars['nonfinite_steps'] = self.nonfinite_steps()
    self.logger.write(step, {f'train/{k}': v for k, v in scalars.items()})
    self.bar.set_postfix(loss=f'{scalars["loss"]:.3f}',
                         acc=f'{scalars["accuracy"]:.1f}')

  def _evaluate(self, split, static=False):
    s = self.state
    if static:
      return evaluate(self.static_eval_step, s.params, s.batch_stats, split,
                      self.config, self.data, self.runtime,
                      quant_ranges=s.quant_ranges)
    return evaluate(self.eval_step, s.params, s.batch_stats, split,
                    self.config, self.data, self.runtime)

  def log_eval(self, step, epoch):
    """Evaluates on the validation and test splits; returns the accuracy
    that selects the best checkpoint (validation's if held out)."""
    record = {'epoch': epoch, 'step': step}
    for name, split in (('val', self.data.val), ('test', self.data.test)):
      if split is None:
        continue
      record[name] = self._evaluate(split)
      if networks.uses_static_ranges(self.config):
        # The run's accuracy is the static one; the paper's dynamic one is
        # kept beside it.
        record[f'{name}_dynamic'] = record[name]
        record[name] = self._evaluate(split, static=True)
        self.logger.write(step, {f'{name}_dynamic/{k}': v for k, v in
                                 record[f'{name}_dynamic'].items()})
      self.logger.write(step, {f'{name}/{k}': v
                               for k, v in record[name].items()})
    self.meta['history'].append(record)
    self.bar.write(f'epoch {epoch}/{self.num_epochs}: test accuracy '
                   f'{record["test"]["accuracy"]:.2f}%')
    return record['val' if self.data.val is not None else 'test']['accuracy']

  def save_best(self, step):
    checkpoints.save(self.best, step, self.state, self.meta)
    # A checkpoint of this step must imply its best checkpoint.
    checkpoints.wait(self.best)

  def save(self, step):
    checkpoints.save(self.latest, step, self.state, self.meta)

  def wait_for_saves(self):
    for mngr in (self.latest, self.best):
      checkpoints.wait(mngr)

  def check_saves(self):
    """Raises the error of a checkpoint write that failed in the background.

    Without it, training would go on without a checkpoint until the next
    save noticed the failure.
    """
    for mngr in (self.latest, self.best):
      checkpoints.check(mngr)

  def result(self):
    return run_result.build(self.meta, self.seed, int(self.state.step),
                            self.nonfinite_steps())


class ProgressBar(tqdm):
  """A tqdm bar of steps whose rate and ETA leave out the compiling step.

  The first step of an invocation compiles the step (seconds to minutes):
  a rate over it made the first ETA tens of minutes too long, and tqdm's
  smoothed rate kept it for many steps. This bar's rate counts the steps from
  ``restart_clock`` on (the loop calls it after the first step) over the time
  since, and is '?' before; the elapsed time stays the bar's own, from its
  start, so it never goes back (moving tqdm's start time to the restart made
  it jump back to 0). The rate includes evaluations and checkpoints, which
  recur, so the ETA does too. Nothing here waits for the device: the count
  is of steps enqueued, as before.
  """

  def __init__(self, *args, **kwargs):
    # (time, count) the rate is measured from, or None: no rate yet. Set
    # first: tqdm's constructor draws the bar (format_dict) already.
    self.clock = None
    super().__init__(*args, **kwargs)

  def restart_clock(self):
    """Measures the rate from now and from the current count on."""
    if not self.disable:  # A disabled bar (other processes) has no clock.
      self.clock = (self._time(), self.n)

  @property
  def format_dict(self):
    """tqdm's fields, with the rate measured since ``restart_clock``."""
    fields = super().format_dict
    if self.disable and not hasattr(self, 'unit'):
      return fields  # Disabled from the start (other processes): no fields.
    # (``close`` disables the bar before its last line, which keeps this
    # rate, not tqdm's average over the compilation.)
    rate = None
    if self.clock is not None:
      start, count = self.clock
      seconds = self._time() - start
      if self.n > count and seconds > 0:
        rate = (self.n - count) / seconds
    fields['rate'] = rate
    if rate is None:
      # Without a rate tqdm divides the steps since ``initial`` by the
      # elapsed time (compilation included); none counted gives '?'.
      fields['initial'] = self.n
    return fields


def train_and_evaluate(config, workdir, seed, data, teacher,
                       delta_weights=None, lr_field='optim.lr',
                       new_workdir=True):
  """Trains one student for one seed, resuming from ``workdir`` if possible.

  Args:
    config: the run config.
    workdir: folder of this run (checkpoints, events, metrics, result).
    seed: the seed of this run (initialisation, data order, dropout).
    data: a ``datasets.Data`` (splits and preprocessing).
    teacher: ``{'params', 'batch_stats'}`` of the pretrained network.
    delta_weights: per-map channel weights for DELTA.
    lr_field: the learning rate's config field, for the advice of errors
      (the demo teacher's is ``pretrain.optim.lr``).
    new_workdir: whether a rerun with another config needs a new
      ``--workdir`` (not for a cached teacher: its folder follows its config).

  Returns:
    The run's result dict (also written to ``workdir/result.json``).

  Raises:
    run_result.NonFiniteLossError: a loss became non-finite and
      ``config.on_nonfinite`` is 'stop'; or more than
      ``config.max_nonfinite_fraction`` of the updates were skipped (after
      result.json is written).
    Interrupted: SIGTERM/SIGINT; the current step was checkpointed.
    OSError: a checkpoint or file could not be written.
  """
  # Orbax takes only absolute checkpoint paths.
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  result_path = os.path.join(workdir, files.RESULT)
  if os.path.exists(result_path):
    result = run_result.read(result_path)
    run_result.check_skipped_steps(config, result, workdir, lr_field,
                                   new_workdir)
    return result
  if jax.process_index() == 0:
    # What a writer killed mid-write left (the run's own files only; orbax
    # cleans its checkpoint folders itself).
    files.remove_stale_temporaries(workdir)
  run = _Run(config, workdir, seed, data, teacher, delta_weights,
             run_result.rerun_advice(lr_field, new_workdir))
  start_step = run.restore()
  batches = run.train_batches(start_step)
  run.open_logs(start_step)
  # Metrics stay on the device until a log, evaluation or checkpoint point,
  # so the loop only enqueues work and never waits for a step to finish.
  pending, t_start, t_log = [], time.time(), time.time()
  with contextlib.ExitStack() as stack:
    stack.callback(run.close_logs)
    stop = stack.enter_context(_StopRequest())
    stack.push(functools.partial(checkpoints.settle, (run.latest, run.best)))
    for step in range(start_step + 1, run.total_steps + 1):
      run.check_saves()
      pending.append((step, run.train(next(batches))))
      if step == start_step + 1:
        run.restart_clock()
      epoch, in_epoch = divmod(step, run.steps_per_epoch)
      do_eval = not in_epoch and (epoch % config.eval_every_epochs == 0 or
                                  step == run.total_steps)
      do_save = do_eval or bool(config.checkpoint_every_steps and
                                step % config.checkpoint_every_steps == 0)
      # Read once: a signal during this step's logging or saving is acted on
      # after the next step, so a stop always comes with its checkpoint.
      # Several processes agree at log and save points only (a collective).
      stopping = None
      if jax.process_count() == 1 or do_save or not (
          step % config.log_every_steps):
        stopping = stop.agreed()
      do_save = do_save or stopping is not None
      if step % config.log_every_steps and not do_save:
        continue
      run.log_train(step, run.fetch_checked(pending), time.time() - t_log)
      pending, t_log = [], time.time()
      if do_eval:
        accuracy = run.log_eval(step, epoch)
        if accuracy > run.meta['best_accuracy']:
          run.meta['best_accuracy'] = accuracy
          run.save_best(step)
      if do_save:
        run.meta['wall_time_s'] += time.time() - t_start
        t_start = time.time()
        run.save(step)
      if stopping is not None:
        run.wait_for_saves()
        cause = signal.Signals(stopping).name + (
            '' if stop.signum else ' on another process')
        raise Interrupted(
            f'{cause}: stopped after step {step} and saved a checkpoint in '
            f'{workdir}/checkpoints; rerun the same command to resume.',
            stopping)
    run.wait_for_saves()
  result = run.result()
  if run.runtime.is_main:
    files.write_json(result_path, result)
  run_result.check_skipped_steps(config, result, workdir, lr_field,
                                 new_workdir)
  return result

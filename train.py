"""Train a Flax Llama with GaLore (or AdamW) on one device or a data x FSDP mesh of all devices.

  python train.py --config configs/tiny.py [--config.train.steps=1000 ...]
  python train.py --config configs/llama1b.py --config.mesh.data=2 --config.mesh.fsdp=4   # 8 devices
  python train.py --config configs/llama7b.py --dry_run      # will it fit? (allocates nothing, seconds)
  python train.py --config configs/llama7b_24gb.py --dry_run_compile   # and XLA's figures of the compiled step

On several hosts, start the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (see the README, "Multiple devices").

A workdir that holds checkpoints resumes from the latest one (or from ``checkpoint.resume_step``) and
continues exactly where it stopped (same batches, same loss series). One run at a time holds a workdir.

Every way a run ends is one line and an exit code:
  0    done (all train.steps run)
  2    bad input: a config value, a workdir in use or not writable, a checkpoint that does not fit or is
       damaged, an unreadable metrics file; nothing in the workdir was changed (start-up may have added
       to its caches: the token cache, a trained tokenizer)
  3    diverged: non-finite loss or gradients (train.nonfinite, train.max_nonfinite_steps); the steps since
       the last finite one are not saved
  4    a checkpoint could not be written (full disk...); the earlier checkpoints are intact
  130  stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM: a checkpoint of the last step when there was
       one to save (a second signal exits at once without it)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable

from absl import flags
from ml_collections import config_flags

_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the train step's memory breakdown, analytically (seconds, even "
                              "for Llama-7B on a CPU); allocates nothing, reads no data, writes nothing.")
_DRY_RUN_COMPILE = flags.DEFINE_bool("dry_run_compile", False, "--dry_run plus XLA's figures: compile the train step "
                                      "on abstract shapes (minutes for Llama-7B on a CPU; "
                                      "on a GPU also one real step).")
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = 4


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
  """One line on stderr and the exit code; bad input (code 2) has changed nothing in the workdir (caches aside)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def warn(message: str) -> None:
  from tqdm import tqdm

  tqdm.write(f"warning: {message}", file=sys.stderr)


def prepare_workdir(workdir: str, lock: bool):
  """Create ``workdir``, take its lock (``lock``: the first process of a run) and check it is writable.

  Returns the :class:`~galore_jax.train.workdir.WorkdirLock` (or None); another live run's lock is bad input.
  """
  from galore_jax.train import workdir as workdir_lib

  held = None
  try:
    os.makedirs(workdir, exist_ok=True)
    if lock:
      held = workdir_lib.WorkdirLock(workdir)
      held.acquire()
    descriptor, probe = tempfile.mkstemp(prefix=".write_probe-", dir=workdir)  # one per process of a run
    with os.fdopen(descriptor, "w") as f:
      f.write("ok")
    os.remove(probe)
  except workdir_lib.WorkdirBusy as e:
    fail(str(e))
  except OSError as e:
    fail(f"workdir {workdir!r} is not writable: {e.strerror}")
  if held is not None and held.stale_pid is not None:
    print(f"workdir lock of process {held.stale_pid} was stale (that run ended without releasing it); taken over",
          flush=True)
  return held


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
  """The handlers of Ctrl-C (SIGINT) and SIGTERM; ``requested`` once a signal asked the training loop to stop.

  During start-up (before the first step) a signal ends the run at once with one line: nothing was trained,
  so nothing is saved (what start-up writes is written whole, by renames, or is a temporary). During
  training the first signal stops the loop at the next step boundary and the run saves that step; a second
  exits at once without it (the earlier checkpoints are complete: orbax renames a checkpoint into place
  only when it is whole). Installed before the heavy imports, so Ctrl-C during ``import jax`` is one line too.
  """

  def __init__(self):
    self.signum: int | None = None
    self.from_peer = False  # the signal reached another process of a multi-host run
    self.training = False
    for signum in STOP_SIGNALS:
      signal.signal(signum, self._handle)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  def start_training(self) -> None:
    """From now on a first signal stops the loop at a step boundary instead of ending the process."""
    self.training = True

  def agreed(self, step: int, every: int) -> bool:
    """Whether the loop stops before ``step``: this process's request alone, or with several processes, the
    same answer on all of them (the checkpoint of a multi-host run is written by all together, so one that
    stopped alone would wait for the others forever).

    With several processes, SIGTERM is taken by JAX's preemption notifier (``jax.distributed``), not by this
    handler: it tells every process, and ``reached_preemption_sync_point`` names the step where all stop (it
    must be asked at every step). A SIGINT that reached one process is exchanged at the steps that are
    multiples of ``every`` (a log step, which syncs anyway); the others take its name and exit code.
    """
    import jax

    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
      return True
    if step % every:
      return False
    import numpy as np

    signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
    if self.signum is None and signums.any():
      self.signum, self.from_peer = int(signums[signums > 0][0]), True
    return self.requested

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if not self.training:
      _exit(128 + signum, f"stopped by {name} during start-up, before the first step: nothing was saved")
    if self.requested:
      _exit(128 + signum, f"stopped by a second {name}: exiting at once without a checkpoint of this step "
            "(the earlier checkpoints are complete)")
    self.signum = signum
    _say(f"{name}: stopping after this step with a checkpoint ({name} again exits at once)")


def _say(message: str) -> None:
  # os.write, not print: a handler may run while the main thread is inside print, which is not reentrant.
  os.write(2, (message + "\n").encode())


def _exit(code: int, message: str) -> None:
  _say(message)
  os._exit(code)


class NoMetrics:
  """The metrics writer of the processes other than the first."""

  def write(self, step, values):
    del step, values

  def close(self):
    pass


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` when ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) is set: one process
  per host, each with ``JAX_NUM_PROCESSES`` and its own ``JAX_PROCESS_ID``. Bad values, or a coordinator that
  does not answer, are bad input. On CPUs the processes' collectives go over gloo (jax's default)."""
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  host, _, port = address.rpartition(":")
  if not (host and port.isdigit() and 0 < int(port) < 65536):  # jax's gRPC server crashes on a bad port
    fail(f"JAX_COORDINATOR_ADDRESS must be host:port, got {address!r}")
  count, index = os.environ.get("JAX_NUM_PROCESSES", ""), os.environ.get("JAX_PROCESS_ID", "")
  if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
    fail(f"JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers with "
         f"0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES, got {count!r} and {index!r}")
  import jax

  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=int(count), process_id=int(index))
  except Exception as e:  # noqa: BLE001 - jax raises RuntimeError or its XlaRuntimeError, with a gRPC dump
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    fail(f"jax.distributed.initialize (coordinator {address}, process {index} of {count}) failed: {reason}")


@dataclasses.dataclass
class Run:
  """What the training loop works on, from start-up to exit."""

  cfg: Any
  dataset: Any
  ckpts: Any
  step_fns: Any
  put: Callable
  writer: Any
  primary: bool
  start: int
  params: Any
  opt_state: Any
  nonfinite_steps: int = 0  # non-finite steps so far, carried in the checkpoints
  step: int = 0


def run(cfg, stop: StopRequests) -> None:
  import jax

  from galore_jax.train import checkpoint, config, divergence, out_of_memory

  initialize_distributed()
  dry = _DRY_RUN.value or _DRY_RUN_COMPILE.value
  downloaded = lambda directory: os.path.isfile(os.path.join(directory, "config.json"))
  if dry and cfg.model.hf_checkpoint and not downloaded(cfg.model.hf_checkpoint):  # will it fit, before the download
    print(f"model.hf_checkpoint {cfg.model.hf_checkpoint!r} has no config.json: the dry run sizes the preset "
          f"{cfg.model.preset!r} instead", flush=True)
    cfg.model.hf_checkpoint = None
  try:
    config.validate(cfg)
  except config.ConfigError as e:
    fail(str(e))
  if dry:
    from galore_jax.train import dry_run

    report = dry_run.dry_run(cfg, compile=_DRY_RUN_COMPILE.value)
    print(dry_run.format_report(report))
    print(json.dumps(report))
    return
  primary = jax.process_index() == 0  # with several hosts, one locks the workdir and writes config and metrics
  lock = prepare_workdir(cfg.workdir, lock=primary)
  checkpoint.quiet_orbax_logging()
  try:
    r = start_up(cfg, primary)
    stop.start_training()
    try:
      train_loop(r, stop)
    except divergence.Diverged as e:
      end_with_error(r, f"{e}; not saved since the last finite step", EXIT_DIVERGED)
    except checkpoint.SaveFailed as e:
      end_with_error(r, f"{e}; stopped at step {r.step}", EXIT_SAVE_FAILED)
    except out_of_memory.OutOfMemory as e:  # the config does not fit the device: bad input
      end_with_error(r, str(e), EXIT_BAD_INPUT)
    finish(r, stop)
  finally:
    if lock is not None:
      lock.release()


def start_up(cfg, primary: bool) -> Run:
  """Data, model and optimizer state (restored or new), metrics: every check passes before the workdir changes."""
  import jax

  from galore_jax.train import base_model, checkpoint, config, data, metrics, sharding, steps
  from galore_jax.train.workdir import write_text_atomic

  model_cfg = config.model_config(cfg)
  try:
    dataset = data.build_data(cfg.data, workdir=cfg.workdir, vocab_size=model_cfg.vocab_size,
                              batch_size=cfg.train.batch_size,
                              eval_batch_size=cfg.eval.batch_size or cfg.train.batch_size // cfg.train.grad_accum,
                              eval_batches=cfg.eval.batches, seed=cfg.seed,
                              progress=(lambda line: print(line, flush=True)) if primary else None)
  except ValueError as e:
    fail(str(e))
  ckpts = checkpoint.Checkpoints(os.path.join(cfg.workdir, "checkpoints"), every=cfg.checkpoint.every,
                                 keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  tx = config.build_optimizer(cfg)
  abstract = config.abstract_model(cfg)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.axis_types)
  # The layerwise step is not one jitted function: it stays on one device (validate refuses a bigger mesh).
  layout = None if cfg.train.layerwise else sharding.Layout.build(mesh, tx, steps.params_of(abstract),
                                                                  cfg.mesh.min_shard_size)
  start, graphdef, params, opt_state, meta = restore_or_init(cfg, ckpts, dataset, tx, abstract, layout)
  try:
    writer = metrics.MetricsWriter(cfg.workdir, resume_step=start, on_torn_line=lambda line: warn(
        f"metrics.jsonl: dropped its last line, which a killed run left half-written: {line[:60]!r}")) if primary \
        else NoMetrics()
  except metrics.MetricsFileError as e:
    ckpts.close()
    fail(str(e))
  moved = ckpts.set_aside_after(start, move=primary)
  if moved:
    print(f"resuming from step {start} (checkpoint.resume_step); the later checkpoints are moved to "
          f"{os.path.dirname(moved[0])}, not deleted", flush=True)
  if primary:
    write_text_atomic(os.path.join(cfg.workdir, "config.json"), cfg.to_json_best_effort(indent=2))
    base_model.save_copy(cfg, dataset.tokenizer)  # eval and load_model need no base checkpoint after this
  step_fns = steps.make_steps(graphdef, tx, grad_accum=cfg.train.grad_accum, packed=cfg.data.packing,
                              report_overlap=config.reports_overlap(cfg),
                              layerwise_updates=cfg.train.layerwise, layout=layout,
                              skip_nonfinite=cfg.train.nonfinite == "skip")
  put = (lambda batch: batch) if layout is None else (lambda batch: sharding.shard_batch(batch, mesh))
  device = jax.devices()[0]
  where = device.device_kind if layout is None else f"{device.device_kind} x{mesh.size}, {sharding.describe(mesh)}"
  print(f"{steps.count_params(params) / 1e6:.1f}M parameters on {where}; steps {start} -> {cfg.train.steps}; "
        f"workdir {cfg.workdir}", flush=True)
  print(describe_data(dataset.stats, cfg), flush=True)
  if not dataset.stats["val_tokens"]:
    print(f"no validation text (data.validation_fraction {cfg.data.validation_fraction}): no eval_loss is logged",
          flush=True)
  return Run(cfg, dataset, ckpts, step_fns, put, writer, primary, start, params, opt_state,
             nonfinite_steps=meta.get("nonfinite_steps", 0), step=start)


def describe_data(stats: dict, cfg) -> str:
  """How much text the run has, and how many passes over it its steps make (a small corpus is seen many times)."""
  from galore_jax.train.data import text_size

  count = lambda n, noun: f"{n:,} {noun}" + ("" if n == 1 else "s")
  size = lambda key: f" ({text_size(stats[key])})" if key in stats else ""  # caches recorded before sizes lack it
  epochs = cfg.train.steps * cfg.train.batch_size / stats["train_rows"]
  line = (f"data: {count(stats['train_documents'], 'document')}{size('train_bytes')} for training, "
          f"{stats['train_tokens']:,} tokens ({epochs:.3g} epochs in {count(cfg.train.steps, 'step')} of "
          f"{cfg.train.batch_size} sequences); {count(stats['val_documents'], 'document')}{size('val_bytes')} for "
          f"validation, {stats['val_tokens']:,} tokens")
  if stats["skipped_documents"]:
    line += (f"; {count(stats['skipped_documents'], 'document')} without text skipped (no string in "
             f"data.text_field {cfg.data.text_field!r}, or only whitespace)")
  cap = reached_cap(stats, cfg.data)
  if cap:
    line += f"; {cap} was reached, the rest of data.path is not read (0 reads it all)"
  return line


def reached_cap(stats: dict, data_config) -> str | None:
  """``data.max_documents N`` or ``data.max_bytes N`` when that cap kept the run from reading all of data.path."""
  if not data_config.get("path"):
    return None  # the embedded corpus: always a prefix of the standard library
  documents = stats["train_documents"] + stats["val_documents"]
  text_bytes = stats.get("train_bytes", 0) + stats.get("val_bytes", 0)
  max_documents, max_bytes = data_config.get("max_documents"), data_config.get("max_bytes")
  if max_documents and documents >= max_documents:
    return f"data.max_documents {max_documents:,}"
  if max_bytes and text_bytes > max_bytes - 4:  # the document that crosses the cap is cut to a character boundary
    return f"data.max_bytes {max_bytes:,}"
  return None


def restore_or_init(cfg, ckpts, dataset, tx, abstract, layout):
  """``(start, graphdef, params, opt_state, meta)``: from the checkpoint to resume from, else a new model."""
  import jax
  from flax import nnx

  from galore_jax.train import checkpoint, config, sharding, steps

  saved = ckpts.all_steps()
  resume_step = cfg.checkpoint.resume_step
  if resume_step is not None and resume_step not in saved:
    ckpts.close()
    fail(f"checkpoint.resume_step={resume_step} is not a saved step (saved: {saved or 'none'} in {ckpts.directory})")
  start = saved[-1] if saved and resume_step is None else (resume_step or 0)
  if start:
    abstract_params = steps.params_of(abstract)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    if layout is not None:  # restore onto this run's mesh, whatever mesh saved it
      abstract_params = sharding.with_shardings(abstract_params, layout.params)
      abstract_opt_state = sharding.with_shardings(abstract_opt_state, layout.opt_state)
    try:
      params, opt_state, meta = ckpts.restore(start, abstract_params, abstract_opt_state)
    except checkpoint.CheckpointMismatch as e:
      ckpts.close()
      fail(f"{e} (workdir {cfg.workdir})")
    except checkpoint.CheckpointDamaged as e:
      ckpts.close()
      earlier = [s for s in saved if s < e.step]
      fail(f"{e}; to resume from an earlier step: --config.checkpoint.resume_step={earlier[-1]} (the later steps are "
           f"moved to {ckpts.directory}.set_aside, not deleted)" if earlier else
           f"{e}; there is no earlier checkpoint: move {ckpts.step_dir(e.step)} away to start over")
    try:
      dataset.train.restore(meta["data"])
    except (ValueError, KeyError) as e:
      ckpts.close()
      fail(f"checkpoint step {start} does not fit the configured data: {e}")
    return start, nnx.graphdef(abstract), params, opt_state, meta
  if layout is not None and not cfg.model.hf_checkpoint:  # created split: no device ever holds the whole model
    params = layout.init_params(lambda: steps.params_of(config.build_model(cfg, cfg.seed)))
    return 0, nnx.graphdef(abstract), params, layout.init_opt_state(tx, params), {}
  try:
    model = config.build_model(cfg, cfg.seed)  # an HF checkpoint is read on the host, then split
  except config.ConfigError as e:
    ckpts.close()
    fail(str(e))
  graphdef, params = nnx.graphdef(model), steps.params_of(model)
  del model
  if layout is None:
    return 0, graphdef, params, jax.jit(tx.init)(params), {}
  params = jax.device_put(params, layout.params)
  return 0, nnx.graphdef(abstract), params, layout.init_opt_state(tx, params), {}


def train_loop(r: Run, stop: StopRequests) -> None:
  """Steps until ``train.steps`` or a stop request, then a checkpoint of the last step (if finite).

  Raises :class:`~galore_jax.train.divergence.Diverged`, :class:`~galore_jax.train.checkpoint.SaveFailed` and
  :class:`~galore_jax.train.out_of_memory.OutOfMemory`.
  """
  import jax
  from tqdm import tqdm

  from galore_jax.train import config, divergence, metrics, out_of_memory, steps

  cfg = r.cfg
  schedule = config.learning_rate_schedule(cfg.train)
  device = jax.devices()[0]
  model_cfg = config.model_config(cfg)
  flops_per_token = steps.flops_per_token(model_cfg, steps.count_params(r.params), cfg.data.seq_len)
  peak = metrics.peak_flops(device)

  def report_nonfinite(step, loss, grad_norm):
    r.nonfinite_steps += 1
    r.writer.write(step, {"loss": loss, "grad_norm": grad_norm, "lr": float(schedule(step - 1)),
                          "nonfinite_steps": r.nonfinite_steps})
    if r.primary and cfg.train.nonfinite == "skip":
      warn(f"step {step}: loss {loss}, grad_norm {grad_norm} are not finite: the step was skipped "
           f"({guard.in_a_row} in a row; {cfg.train.max_nonfinite_steps} in a row end the run)")

  guard = divergence.NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_nonfinite_steps, report_nonfinite)
  collapse = divergence.CollapseWatch(model_cfg.vocab_size)
  bar = tqdm(total=cfg.train.steps, initial=r.start, dynamic_ncols=True, mininterval=1.0)
  gap = cfg.optimizer.update_proj_gap if cfg.optimizer.name in config.LOW_RANK else None
  window_tokens, window_start, logged_step = 0.0, time.perf_counter(), r.start
  train_step = out_of_memory.checked_first_step(r.step_fns.train, device)  # a step that does not fit: one line
  try:
    while r.step < cfg.train.steps and not stop.agreed(r.step, cfg.train.log_every):
      batch = next(r.dataset.train)
      r.params, r.opt_state, m = train_step(r.params, r.opt_state, r.put(batch))
      window_tokens = window_tokens + m["tokens"]  # stays on device: no sync
      r.step = step = r.step + 1
      guard.push(step, m)  # checks the step before, which has finished by now, while this one runs
      refreshed = gap is not None and step > 1 and (step - 1) % gap == 0
      if (step % cfg.train.log_every == 0 or step == cfg.train.steps or refreshed) and guard.settle():
        m, tokens = jax.device_get((m, window_tokens))
        elapsed = time.perf_counter() - window_start
        tokens_per_sec = float(tokens) / elapsed
        line = {"loss": m["loss"], "lr": float(schedule(step - 1)), "grad_norm": m["grad_norm"],
                "tokens_per_sec": tokens_per_sec, "step_time": elapsed / (step - logged_step)}
        if "subspace_overlap" in m and math.isfinite(m["subspace_overlap"]):  # this step refreshed some leaves
          line["subspace_overlap"] = m["subspace_overlap"]
        if r.nonfinite_steps:
          line["nonfinite_steps"] = r.nonfinite_steps
        if peak:
          line["mfu"] = flops_per_token * tokens_per_sec / peak
        line.update(metrics.memory_gb(device))
        r.writer.write(step, line)
        if (collapsed := collapse.observe(step, float(m["loss"]), float(m["grad_norm"]))) and r.primary:
          warn(collapsed)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tokens_per_sec:,.0f}")
        window_tokens, window_start, logged_step = 0.0, time.perf_counter(), step
      bar.update(1)
      if step % cfg.eval.every == 0 or step == cfg.train.steps:
        evaluate(r, step)
        window_tokens, window_start, logged_step = 0.0, time.perf_counter(), step
      if r.ckpts.due(step) and guard.settle():  # a non-finite step is never saved
        save(r, step)
      r.ckpts.check_saved()  # a background save that has failed ends the run here
    if guard.settle() and r.step > r.start and r.step not in r.ckpts.all_steps():
      save(r, r.step, force=True)
    r.ckpts.close()
  finally:
    bar.close()


def evaluate(r: Run, step: int) -> None:
  from galore_jax.train import metrics

  eval_loss, _ = metrics.validation_loss(lambda batch: r.step_fns.eval(r.params, r.put(batch)),
                                        r.dataset.eval_batches)
  if eval_loss is not None:
    r.writer.write(step, {"eval_loss": eval_loss, "eval_ppl": metrics.perplexity(eval_loss)})


def save(r: Run, step: int, force: bool = False) -> None:
  """Start saving ``step``; a state with a non-finite entry is never saved (it ends the run as diverged)."""
  from galore_jax.train import divergence, steps

  if not bool(steps.all_finite((r.params, r.opt_state))):
    raise divergence.Diverged(f"step {step}: its loss and gradients were finite, but its parameters or optimizer "
                              "state are not")
  meta = {"step": step, "data": r.dataset.train.state(), "config": json.loads(r.cfg.to_json_best_effort()),
          "nonfinite_steps": r.nonfinite_steps}
  r.ckpts.save(step, r.params, r.opt_state, meta, force=force)


def end_with_error(r: Run, message: str, code: int) -> None:
  """Wait for a save in flight, close the metrics, say where the latest checkpoint is, exit with ``code``."""
  from galore_jax.train import checkpoint

  try:
    r.ckpts.close()
  except checkpoint.SaveFailed as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
  r.writer.close()
  latest = r.ckpts.latest_step()
  print(f"error: {message}; the latest checkpoint is step {latest} in {r.ckpts.directory}" if latest is not None else
        f"error: {message}; there is no checkpoint", file=sys.stderr, flush=True)
  sys.exit(code)


def finish(r: Run, stop: StopRequests) -> None:
  """The last line of a run that ended as planned: done, or stopped by a signal (exit 128 + its number)."""
  r.writer.close()
  latest = r.ckpts.latest_step()
  saved = f"checkpoint step {latest} in {r.ckpts.directory}" if latest is not None else "no checkpoint"
  if r.step >= r.cfg.train.steps or not stop.requested:
    idle = (f" (nothing to train: the checkpoint is at step {r.start}, train.steps is {r.cfg.train.steps})"
            if r.start >= r.step else "")
    print(f"done at step {r.step}{idle}; {saved}", flush=True)
    return
  where = " on another process" if stop.from_peer else ""
  print(f"stopped by {stop.name}{where} at step {r.step}; {saved}; run the same command to resume", flush=True)
  sys.exit(stop.exit_code)


def parse_config():
  """The config file plus --config.x.y overrides, resolved (:func:`galore_jax.train.config.resolve`); any
  command-line mistake is bad input."""
  overrides = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
  args = sys.argv[1:]
  given = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
  given += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
  spec = given[-1] if given else "configs/tiny.py"
  file_config = load_config_file(spec)
  try:
    # config_flags reads the overrides from sys.argv as soon as the flag is defined.
    config = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.", lock_config=True)
    positional = flags.FLAGS(sys.argv)[1:]
  except flags.Error as e:
    line = str(e).splitlines()[0]
    if line.endswith("'None'"):  # ml_collections parses a number key's None as a number
      line += " (a number cannot be set to None on the command line; the data caps take 0 for none)"
    fail(line)
  except (AttributeError, KeyError) as e:
    fail(unknown_key(file_config, args) or f"bad config override in {overrides}: {innermost_message(e)}")
  except (ValueError, TypeError, OSError) as e:
    fail(f"bad config ({overrides or 'no overrides'}): {str(e).splitlines()[0]}")
  if positional:  # absl would ignore it, and a forgotten --config.key= would go unnoticed
    fail(f"unexpected argument {positional[0]!r}: train.py takes flags only (--config=FILE, "
         "--config.section.key=VALUE, --dry_run)")
  from galore_jax.train import config as run_config

  try:
    run_config.resolve(config.value)
  except run_config.ConfigError as e:
    fail(str(e))
  return config.value


def load_config_file(spec: str):
  """``get_config()`` of the config file ``path[:argument]``; a file that does not give a ConfigDict is bad input."""
  import runpy

  from ml_collections import config_dict

  path, _, argument = spec.partition(":")
  if not os.path.isfile(path):
    fail(f"config file {path!r} does not exist")
  try:
    get_config = runpy.run_path(path).get("get_config")
    if get_config is None:
      fail(f"config file {path!r} defines no get_config()")
    cfg = get_config(*([argument] if argument else []))
  except Exception as e:  # noqa: BLE001 - a config file is the user's code: whatever it raises is bad input
    where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
    fail(f"config file {path!r} does not load: {type(e).__name__}: {innermost_message(e)}{where}")
  if not isinstance(cfg, config_dict.ConfigDict):
    fail(f"config file {path!r}: get_config() returned {type(cfg).__name__} {str(cfg)[:40]!r}, not a ConfigDict")
  return cfg


def innermost_message(error: BaseException) -> str:
  """The first line of the innermost message: ml_collections wraps a KeyError('...') in an AttributeError."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0] if error.args else error).strip().strip("'\"")
  return text.splitlines()[0] if text else type(error).__name__


def unknown_key(cfg, args: list[str]) -> str | None:
  """``unknown config key train.stepz (--config.train.stepz=3); did you mean train.steps?`` for the first
  override naming a key that the config file's ``cfg`` does not have; None when every override names one
  (ml_collections' own message is a multi-line repr of a KeyError).
  """
  import difflib

  from ml_collections import config_dict

  for arg in args:
    if not arg.startswith("--config."):
      continue
    walked, node = [], cfg
    for part in arg[len("--config."):].split("=", 1)[0].split("."):
      if not isinstance(node, config_dict.ConfigDict):
        value = f"{'.'.join(walked)} is a value ({type(node).__name__})"
        return f"config key {value}, not a section with key {part!r} ({arg})"
      if part not in node:
        close = difflib.get_close_matches(part, list(node.keys()), n=1)
        where = ".".join(walked) or "the config"
        hint = f"did you mean {'.'.join(walked + close)}?" if close else f"{where} has {', '.join(sorted(node.keys()))}"
        return f"unknown config key {'.'.join(walked + [part])} ({arg}); {hint}"
      walked.append(part)
      node = node[part]
  return None


def main() -> None:
  stop = StopRequests()  # before the heavy imports: a signal during start-up ends the run with one line
  run(parse_config(), stop)


if __name__ == "__main__":
  main()

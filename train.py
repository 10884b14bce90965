"""Train a Flax Llama with GaLore (or AdamW) on one device or a data x FSDP mesh of all devices.

  python train.py --config configs/tiny.py [--config.train.steps=1000 ...]
  python train.py --config configs/llama1b.py --config.mesh.data=2 --config.mesh.fsdp=4   # 8 devices
  python train.py --config configs/llama7b.py --dry_run      # will it fit? (allocates nothing, seconds)
  python train.py --config configs/llama7b_24gb.py --dry_run_compile   # and XLA's figures of the compiled step

On several hosts, start the same command on every host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (see the README, "Multiple devices").

A workdir that holds checkpoints resumes from the latest one and continues exactly where it
stopped (same batches, same loss series). SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

from absl import flags
from ml_collections import config_flags

_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the train step's memory breakdown, analytically (seconds, even "
                              "for Llama-7B on a CPU); allocates nothing, reads no data, writes nothing.")
_DRY_RUN_COMPILE = flags.DEFINE_bool("dry_run_compile", False, "--dry_run plus XLA's figures: compile the train step on "
                                      "abstract shapes (minutes for Llama-7B on a CPU; on a GPU also one real step).")
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
  """Bad input: one line on stderr, exit code 2, nothing in the workdir touched."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    fail(f"workdir {workdir!r} is not writable: {e.strerror}")


class Interrupted:
  """Set by SIGTERM; the loop checkpoints and stops at the next step boundary."""

  def __init__(self):
    self.flag = False
    signal.signal(signal.SIGTERM, self._set)

  def _set(self, *_):
    self.flag = True


class NoMetrics:
  """The metrics writer of the processes other than the first."""

  def write(self, step, values):
    del step, values

  def close(self):
    pass


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when the environment names a coordinator (multi-host runs only)."""
  import jax

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))


def run(cfg) -> None:
  import jax
  from flax import nnx
  from tqdm import tqdm

  from galore_jax.train import checkpoint, config, data, metrics, out_of_memory, sharding, steps

  initialize_distributed()

  try:
    config.validate(cfg)
  except config.ConfigError as e:
    fail(str(e))
  if _DRY_RUN.value or _DRY_RUN_COMPILE.value:
    from galore_jax.train import dry_run

    report = dry_run.dry_run(cfg, compile=_DRY_RUN_COMPILE.value)
    print(dry_run.format_report(report))
    print(json.dumps(report))
    return
  prepare_workdir(cfg.workdir)
  model_cfg = config.model_config(cfg)
  try:
    dataset = data.build_data(cfg.data, workdir=cfg.workdir, vocab_size=model_cfg.vocab_size,
                              batch_size=cfg.train.batch_size,
                              eval_batch_size=cfg.eval.batch_size or cfg.train.batch_size // cfg.train.grad_accum,
                              eval_batches=cfg.eval.batches, seed=cfg.seed)
  except ValueError as e:
    fail(str(e))
  ckpts = checkpoint.Checkpoints(os.path.join(cfg.workdir, "checkpoints"), every=cfg.checkpoint.every,
                                 keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)

  def abort(message):
    ckpts.close()
    fail(message)

  tx = config.build_optimizer(cfg)
  abstract = config.abstract_model(cfg)
  abstract_params = steps.params_of(abstract)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.axis_types)
  # The layerwise step is not one jitted function: it stays on one device (validate refuses a bigger mesh).
  layout = None if cfg.train.layerwise else sharding.Layout.build(mesh, tx, abstract_params, cfg.mesh.min_shard_size)
  start = ckpts.latest_step() or 0
  if start:
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    if layout is not None:  # restore onto this run's mesh, whatever mesh saved it
      abstract_params = sharding.with_shardings(abstract_params, layout.params)
      abstract_opt_state = sharding.with_shardings(abstract_opt_state, layout.opt_state)
    try:
      params, opt_state, meta = ckpts.restore(start, abstract_params, abstract_opt_state)
    except checkpoint.CheckpointMismatch as e:
      abort(f"{e} (workdir {cfg.workdir})")
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds on unreadable files
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      abort(f"checkpoint step {start} in {ckpts.directory} cannot be read: {reason}")
    try:
      dataset.train.restore(meta["data"])
    except (ValueError, KeyError) as e:
      abort(f"checkpoint step {start} does not fit the configured data: {e}")
    graphdef = nnx.graphdef(abstract)
  elif layout is None:
    model = config.build_model(cfg, cfg.seed)
    graphdef, params = nnx.graphdef(model), steps.params_of(model)
    del model
    opt_state = jax.jit(tx.init)(params)
  else:
    graphdef = nnx.graphdef(abstract)
    if cfg.model.hf_checkpoint:  # read on the host, then split
      params = jax.device_put(steps.params_of(config.build_model(cfg, cfg.seed)), layout.params)
    else:  # created split: no device ever holds the whole model
      params = layout.init_params(lambda: steps.params_of(config.build_model(cfg, cfg.seed)))
    opt_state = layout.init_opt_state(tx, params)
  primary = jax.process_index() == 0  # with several hosts, one writes the config and the metrics
  if primary:
    with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))

  galore = cfg.optimizer.name.startswith("galore")
  step_fns = steps.make_steps(graphdef, tx, grad_accum=cfg.train.grad_accum, packed=cfg.data.packing,
                              report_overlap=galore, layerwise_updates=cfg.train.layerwise, layout=layout)
  put = (lambda batch: batch) if layout is None else (lambda batch: sharding.shard_batch(batch, mesh))
  schedule = config.learning_rate_schedule(cfg.train)
  device = jax.devices()[0]
  train_step = out_of_memory.checked_first_step(step_fns.train, device)  # a step that does not fit is bad input
  n_params = steps.count_params(params)
  flops_per_token = steps.flops_per_token(model_cfg, n_params, cfg.data.seq_len)
  peak = metrics.peak_flops(device)
  writer = metrics.MetricsWriter(cfg.workdir, resume_step=start) if primary else NoMetrics()
  interrupted = Interrupted()

  def evaluate(step):
    loss_sum = tokens = 0.0
    for batch in dataset.eval_batches:
      l, t = step_fns.eval(params, put(batch))
      loss_sum, tokens = loss_sum + float(l), tokens + float(t)
    eval_loss = loss_sum / max(tokens, 1.0)
    writer.write(step, {"eval_loss": eval_loss, "eval_ppl": float(min(1e30, 2.718281828459045**eval_loss))})
    return eval_loss

  def save(step, force=False):
    meta = {"step": step, "data": dataset.train.state(), "config": json.loads(cfg.to_json_best_effort())}
    ckpts.save(step, params, opt_state, meta, force=force)

  where = device.device_kind if layout is None else f"{device.device_kind} x{mesh.size}, {sharding.describe(mesh)}"
  print(f"{n_params / 1e6:.1f}M parameters on {where}; steps {start} -> {cfg.train.steps}; "
        f"workdir {cfg.workdir}", flush=True)
  bar = tqdm(total=cfg.train.steps, initial=start, dynamic_ncols=True, mininterval=1.0)
  gap = cfg.optimizer.update_proj_gap if galore else None
  window_tokens, window_start, logged_step = 0.0, time.perf_counter(), start
  step = start
  while step < cfg.train.steps and not interrupted.flag:
    batch = next(dataset.train)
    try:
      params, opt_state, m = train_step(params, opt_state, put(batch))
    except out_of_memory.OutOfMemory as e:
      bar.leave = False
      bar.close()
      abort(str(e))
    window_tokens = window_tokens + m["tokens"]  # stays on device: no sync
    step += 1
    refreshed = gap is not None and step > 1 and (step - 1) % gap == 0
    if step % cfg.train.log_every == 0 or step == cfg.train.steps or refreshed:
      m, tokens = jax.device_get((m, window_tokens))
      elapsed = time.perf_counter() - window_start
      tokens_per_sec = float(tokens) / elapsed
      line = {"loss": m["loss"], "lr": float(schedule(step - 1)), "grad_norm": m["grad_norm"],
              "tokens_per_sec": tokens_per_sec, "step_time": elapsed / (step - logged_step)}
      if "subspace_overlap" in m and math.isfinite(m["subspace_overlap"]):  # this step refreshed some leaves
        line["subspace_overlap"] = m["subspace_overlap"]
      if peak:
        line["mfu"] = flops_per_token * tokens_per_sec / peak
      line.update(metrics.memory_gb(device))
      writer.write(step, line)
      bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tokens_per_sec:,.0f}")
      window_tokens, window_start, logged_step = 0.0, time.perf_counter(), step
    bar.update(1)
    if step % cfg.eval.every == 0 or step == cfg.train.steps:
      evaluate(step)
      window_tokens, window_start, logged_step = 0.0, time.perf_counter(), step
    save(step)
  bar.close()
  if step > start:
    save(step, force=step not in ckpts.all_steps())
  ckpts.close()
  writer.close()
  print(f"{'stopped by SIGTERM' if interrupted.flag else 'done'} at step {step}; checkpoint in "
        f"{ckpts.directory}", flush=True)


def parse_config():
  """The config file plus --config.x.y overrides; any command-line mistake is bad input."""
  overrides = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
  args = sys.argv[1:]
  given = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
  given += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
  path = (given[-1] if given else "configs/tiny.py").split(":")[0]
  if not os.path.isfile(path):
    fail(f"config file {path!r} does not exist")
  try:
    # config_flags reads the overrides from sys.argv as soon as the flag is defined.
    config = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.", lock_config=True)
    flags.FLAGS(sys.argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:
    fail(f"unknown config key {str(e).strip(chr(34))} in {overrides}")
  except (ValueError, TypeError, OSError) as e:
    fail(f"bad config ({overrides or 'no overrides'}): {str(e).splitlines()[0]}")
  return config.value


def main() -> None:
  run(parse_config())


if __name__ == "__main__":
  main()

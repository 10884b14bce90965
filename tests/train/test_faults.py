"""The app's faults, injected in-process: a non-finite step skipped whole, divergence counting, a collapse warning,
torn metrics lines, the workdir lock, stop signals, failed and damaged checkpoints, NaN config values."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import base
from galore_jax.models import llama
from galore_jax.train import checkpoint, config, divergence, metrics, steps, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=16)


def batch(seed, poisoned=False):
  """A batch; ``poisoned``: one NaN in the loss mask, so the loss and every gradient are NaN."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (4, 17), dtype=np.int32)
  mask = np.ones((4, 16), np.float32)
  if poisoned:
    mask[0, 3] = np.nan
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((4, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}


def make_step(layerwise, grad_clip, optimizer="galore_adamw"):
  """The guarded train step of a GaLore run (gap 2) and a fresh ``(params, opt_state)``."""
  cfg = base()
  cfg.optimizer.name = optimizer
  cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps = 1e-2, 0, 10
  cfg.train.layerwise, cfg.train.grad_clip = layerwise, grad_clip
  cfg.optimizer.rank, cfg.optimizer.update_proj_gap = 4, 2
  model = llama.Llama(CFG, rngs=nnx.Rngs(0))
  tx = config.build_optimizer(cfg)
  fns = steps.make_steps(nnx.graphdef(model), tx, grad_accum=1, packed=False, report_overlap=True,
                         layerwise_updates=layerwise, skip_nonfinite=True)
  params = jax.device_get(steps.params_of(model))

  def fresh():  # new buffers each time: the step donates its inputs
    return jax.tree.map(jnp.asarray, params), tx.init(jax.tree.map(jnp.asarray, params))

  return fns.train, fresh


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("layerwise,grad_clip,optimizer", [
    (False, 0.0, "galore_adamw"), (True, 0.0, "galore_adamw"), (True, 1.0, "galore_adamw"),
    (False, 1.0, "galore_adamw_8bit"), (False, 0.0, "adamw")])  # adamw: optax's, selected after its update
def test_a_skipped_step_changes_nothing(layerwise, grad_clip, optimizer):
  """A NaN step at a refresh step (count 2, gap 2) leaves weights, moments, bases and count bit-identical, so the
  run continues exactly as if that batch had never come (unguarded, the NaN would reach every weight)."""
  step, fresh = make_step(layerwise, grad_clip, optimizer)
  params, state = fresh()
  for t in (0, 1):
    params, state, m = step(params, state, batch(t))
    assert bool(m["finite"])
  before = jax.device_get((params, state))
  params, state, m = step(params, state, batch(2, poisoned=True))
  assert not bool(m["finite"]) and math.isnan(float(m["loss"])) and not math.isfinite(float(m["grad_norm"]))
  assert_trees_equal(jax.device_get((params, state)), before)
  params, state, _ = step(params, state, batch(3))

  ref_params, ref_state = fresh()
  for t in (0, 1, 3):
    ref_params, ref_state, _ = step(ref_params, ref_state, batch(t))
  assert_trees_equal(jax.device_get((params, state)), jax.device_get((ref_params, ref_state)))


def test_all_finite_sees_one_nan_and_ignores_integer_leaves():
  tree = {"a": jnp.ones((3,)), "q": jnp.full((2,), 7, jnp.int8)}
  assert bool(steps.all_finite(tree))
  tree["b"] = jnp.array([1.0, jnp.inf])
  assert not bool(steps.all_finite(tree))


# ----------------------------------------------------------------------------- divergence accounting


def fake(finite, loss=1.0):
  return {"finite": np.bool_(finite), "loss": np.float32(loss if finite else np.nan),
          "grad_norm": np.float32(1.0 if finite else np.inf)}


def test_guard_reads_one_step_late_counts_streaks_and_stops_at_the_limit():
  reports = []
  guard = divergence.NonFiniteGuard("skip", 3, lambda *a: reports.append(a))
  guard.push(1, fake(True))
  guard.push(2, fake(False))
  assert reports == []  # step 2 is held until the next step is queued
  guard.push(3, fake(False))
  assert [r[0] for r in reports] == [2]
  assert not guard.settle()  # step 3 checked now: non-finite, so not to be saved
  guard.push(4, fake(True))
  assert guard.settle() and guard.total == 2 and guard.in_a_row == 0
  for s in (5, 6):
    guard.push(s, fake(False))
  with pytest.raises(divergence.Diverged, match=r"steps 5-7 .*3 in a row, train.max_nonfinite_steps=3"):
    guard.push(7, fake(False))
    guard.settle()
  assert [r[0] for r in reports] == [2, 3, 5, 6, 7] and math.isnan(reports[-1][1]) and reports[-1][2] == math.inf


def test_guard_stop_policy_stops_at_the_first_nonfinite_step():
  guard = divergence.NonFiniteGuard("stop", 3, lambda *a: None)
  guard.push(1, fake(True))
  guard.push(2, fake(False))
  with pytest.raises(divergence.Diverged, match=r"loss nan and grad_norm inf at step 2 .*train.nonfinite='stop'"):
    guard.settle()


def test_collapse_warning_needs_a_zero_gradient_with_positive_loss_twice_in_a_row():
  watch = divergence.CollapseWatch(vocab_size=512)
  uniform = math.log(512)
  assert watch.observe(10, 0.0, 0.0) is None  # a batch without targets: loss 0, gradient 0
  assert watch.observe(20, uniform, 0.0) is None
  assert watch.observe(30, 5.0, 0.1) is None  # the streak is broken
  assert watch.observe(40, uniform, 0.0) is None
  message = watch.observe(50, uniform, 0.0)
  assert message.startswith("step 50: the gradient is exactly 0") and "ln(vocab_size 512)" in message
  assert watch.observe(60, uniform, 0.0) is None  # once per run


# ----------------------------------------------------------------------------- metrics


def test_metrics_keep_nan_and_infinity_and_drop_a_torn_last_line(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=0, tensorboard=False)
  writer.write(1, {"loss": np.float32(np.nan), "grad_norm": np.float32(np.inf)})
  writer.write(2, {"loss": 2.5})
  writer.close()
  path = tmp_path / "metrics.jsonl"
  first = path.read_text().splitlines()[0]
  assert '"loss": NaN' in first and '"grad_norm": Infinity' in first
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')  # a run killed in the middle of a line
  torn = []
  rows = metrics.read_metrics(str(path), torn.append)
  assert [r["step"] for r in rows] == [1, 2] and math.isnan(rows[0]["loss"]) and rows[0]["grad_norm"] == math.inf
  assert torn == ['{"step": 3, "lo']
  metrics.MetricsWriter(str(tmp_path), resume_step=5, tensorboard=False).close()  # resuming drops the torn line
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(metrics.MetricsFileError, match=r"metrics.jsonl line 2 is not JSON"):
    metrics.MetricsWriter(str(tmp_path), resume_step=5, tensorboard=False)
  assert path.read_text() == '{"step": 1}\nnot json\n{"step": 3}\n'  # left as it was


def test_validation_loss_is_per_token_and_none_without_validation_text():
  sums = {0: (6.0, 2.0), 1: (3.0, 4.0)}  # (summed loss, predicted tokens) per batch
  assert metrics.validation_loss(sums.get, [0, 1]) == (1.5, 6.0)
  assert metrics.validation_loss(sums.get, []) == (None, 0.0)  # not 0: that would read as a perfect model
  assert metrics.validation_loss(lambda batch: (0.0, 0.0), [0]) == (None, 0.0)


def test_perplexity_of_huge_and_nan_losses():
  assert metrics.perplexity(1.0) == pytest.approx(math.e)
  assert metrics.perplexity(1e6) == math.inf and math.isnan(metrics.perplexity(math.nan))


# ----------------------------------------------------------------------------- workdir lock


def test_a_held_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
  first = workdir.WorkdirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(workdir.WorkdirBusy, match=rf"in use by process {os.getpid()} "):
    workdir.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  again = workdir.WorkdirLock(str(tmp_path))
  again.acquire()
  assert again.stale_pid is None  # released cleanly: nothing stale
  again.release()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
  code = ("import sys, time; from galore_jax.train import workdir; workdir.WorkdirLock(sys.argv[1]).acquire(); "
          "print('held', flush=True); time.sleep(60)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir.WorkdirBusy, match=rf"process {holder.pid} "):
    workdir.WorkdirLock(str(tmp_path)).acquire()
  holder.kill()
  holder.wait()
  lock = workdir.WorkdirLock(str(tmp_path))
  lock.acquire()
  assert lock.stale_pid == holder.pid
  lock.release()


# ----------------------------------------------------------------------------- stop signals


def run_signals(body):
  code = ("import os, signal, time; import train; stop = train.StopRequests(); " + body +
          "; time.sleep(30); print('not reached', flush=True)")
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_several_processes_stop_together_at_a_log_step_with_any_ones_signal(monkeypatch):
  """Multi-host: a signal that reached one process stops all of them at the same log step (the checkpoint is
  written by all together); the others take its name and exit code."""
  import jax
  from jax.experimental import multihost_utils

  import train

  handlers = {s: signal.getsignal(s) for s in train.STOP_SIGNALS}
  try:
    ours, theirs = train.StopRequests(), train.StopRequests()
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
  ours.signum = signal.SIGINT  # as the handler records a first signal during training
  assert ours.agreed(3, 2)  # one process: its own request, at once
  exchanged = []

  def allgather(x):  # two processes: ours (SIGINT) and theirs (none)
    exchanged.append(int(x))
    return np.array([signal.SIGINT, int(x)], np.int32)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  assert not theirs.agreed(3, 2) and not ours.agreed(5, 2) and exchanged == []  # not a log step: no exchange
  assert theirs.agreed(4, 2) and exchanged == [0]
  assert (theirs.name, theirs.exit_code, theirs.from_peer, ours.from_peer) == ("SIGINT", 130, True, False)


def test_a_signal_during_start_up_ends_the_run_at_once_with_one_line():
  result = run_signals("os.kill(os.getpid(), signal.SIGTERM)")
  assert result.returncode == 143 and "not reached" not in result.stdout
  assert result.stderr.strip().splitlines() == [
      "stopped by SIGTERM during start-up, before the first step: nothing was saved"]


def test_during_training_the_first_sigint_asks_to_stop_and_the_second_exits_at_once():
  result = run_signals("stop.start_training(); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5); "
                       "print(stop.requested, stop.exit_code, flush=True); os.kill(os.getpid(), signal.SIGINT)")
  assert result.returncode == 130 and result.stdout.split() == ["True", "130"]
  first, second = result.stderr.strip().splitlines()
  assert first.startswith("SIGINT: stopping after this step with a checkpoint")
  assert second.startswith("stopped by a second SIGINT: exiting at once")


# ----------------------------------------------------------------------------- checkpoints


TREE = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones((8,))}


def saved_checkpoints(directory, steps_to_save=(1, 2)):
  ckpts = checkpoint.Checkpoints(str(directory), every=1, keep=10, async_save=False)
  for s in steps_to_save:
    ckpts.save(s, TREE, {"m": TREE}, {"step": s})
  ckpts.close()
  return checkpoint.Checkpoints(str(directory), every=1, keep=10, async_save=False)


def restore(ckpts, step):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), TREE)
  return ckpts.restore(step, abstract, {"m": abstract})


# Orbax's commit thread, torn down after the injected error, sometimes schedules on its closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_background_save_is_reported_at_the_next_check_and_the_previous_step_survives(tmp_path, monkeypatch):
  """The fault is injected where a full disk strikes: the write of a file, in orbax's background thread."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  original, calls = json_checkpoint_handler.JsonCheckpointHandler._save_fn, []

  async def full_disk_on_second_save(self, x, directory):
    calls.append(directory)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await original(self, x, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk_on_second_save)
  ckpts = checkpoint.Checkpoints(str(tmp_path / "ck"), every=1, keep=1)
  assert ckpts.save(1, TREE, {"m": TREE}, {"step": 1})
  ckpts.wait()
  assert ckpts.save(2, TREE, {"m": TREE}, {"step": 2})  # returns at once; the write fails in the background
  deadline = time.time() + 60
  with pytest.raises(checkpoint.SaveFailed, match=r"checkpoint step 2 could not be saved to .*/ck/2: \[Errno 28\] No "
                                                  r"space left on device"):
    while time.time() < deadline:
      ckpts.check_saved()
      time.sleep(0.01)
  ckpts.close()
  # Read-only: a writable manager would clean up step 2's temporary directory under orbax's other commit threads.
  reopened = checkpoint.Checkpoints(str(tmp_path / "ck"), every=1, keep=1, read_only=True)
  assert reopened.all_steps() == [1]  # keep=1, yet step 1 was not deleted for a step 2 that never completed
  params, _, meta = restore(reopened, 1)
  np.testing.assert_array_equal(params["w"], TREE["w"])
  assert meta == {"step": 1}


def first_file(root, pattern):
  return sorted(p for p in root.glob(pattern) if p.is_file())[0]


@pytest.mark.parametrize("damage,named", [
    (lambda s: (s / "params" / "_METADATA").unlink(), r"params/_METADATA is missing"),
    (lambda s: (s / "opt_state" / "_METADATA").write_text("{"), r"opt_state/_METADATA is not readable JSON"),
    (lambda s: (s / "meta" / "metadata").unlink(), r"meta/metadata is missing"),
    (lambda s: [p.unlink() for p in (s / "opt_state" / "d").iterdir()], r"NOT_FOUND: .*opt_state/d/[0-9a-f]+"),
    (lambda s: open(s / "params" / "manifest.ocdbt", "r+b").truncate(10),
     r"DATA_LOSS: .*params/manifest.ocdbt.*Encoded length"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_step_and_the_file(tmp_path, damage, named):
  ckpts = saved_checkpoints(tmp_path / "ck")
  damage(tmp_path / "ck" / "2")
  with pytest.raises(checkpoint.CheckpointDamaged, match=r"^checkpoint step 2 in .*/ck is damaged: " + named) as e:
    restore(ckpts, 2)
  assert e.value.step == 2 and "\n" not in str(e.value) and "tensorstore_spec" not in str(e.value)
  assert restore(ckpts, 1)[2] == {"step": 1}  # the earlier step is untouched


def test_set_aside_moves_the_later_steps_and_saving_them_again_works(tmp_path):
  ckpts = saved_checkpoints(tmp_path / "ck", (1, 2, 3))
  moved = ckpts.set_aside_after(1)
  assert moved == [str(tmp_path / "ck.set_aside" / "2"), str(tmp_path / "ck.set_aside" / "3")]
  assert ckpts.all_steps() == [1] and os.path.exists(tmp_path / "ck.set_aside" / "3" / "params" / "_METADATA")
  ckpts.save(2, TREE, {"m": TREE}, {"step": 2})
  assert ckpts.all_steps() == [1, 2]
  ckpts.set_aside_after(1)  # a second set-aside of step 2 does not overwrite the first
  assert sorted(os.listdir(tmp_path / "ck.set_aside")) == ["2", "2.1", "3"]


NEVER_AWAITED = """
import sys
from galore_jax.train import checkpoint
if sys.argv[1] == "with_checkpoints":
  checkpoint.quiet_orbax_logging()
  checkpoint.Checkpoints(sys.argv[2], every=1, keep=1, read_only=True)

async def write_fragment():
  pass

pending = write_fragment()  # never awaited, as one of orbax's writes after a failed save: Python warns at exit
"""


@pytest.mark.parametrize("process", ["with_checkpoints", "without"])
def test_a_coroutine_left_by_a_failed_save_is_not_reported_at_exit(tmp_path, process):
  done = subprocess.run([sys.executable, "-c", NEVER_AWAITED, process, str(tmp_path)], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert done.returncode == 0
  warned = "RuntimeWarning: coroutine 'write_fragment' was never awaited" in done.stderr
  assert warned == (process == "without"), done.stderr  # the check can see it: Python does print it otherwise


def test_read_only_checkpoints_create_nothing(tmp_path):
  assert checkpoint.Checkpoints(str(tmp_path / "none"), every=1, keep=1, read_only=True).all_steps() == []
  assert os.listdir(tmp_path) == []
  saved_checkpoints(tmp_path / "ck").close()
  before = sorted(str(p) for p in (tmp_path / "ck").rglob("*"))
  reader = checkpoint.Checkpoints(str(tmp_path / "ck"), every=1, keep=1, read_only=True)
  assert reader.all_steps() == [1, 2] and restore(reader, 2)[2] == {"step": 2}
  reader.close()
  assert sorted(str(p) for p in (tmp_path / "ck").rglob("*")) == before


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value,needle", [
    ("train.lr", float("nan"), "train.lr must be a finite number, got nan"),
    ("optimizer.scale", float("inf"), "optimizer.scale must be a finite number, got inf"),
    ("train.nonfinite", "ignore", "train.nonfinite must be one of"),
    ("train.max_nonfinite_steps", 0, "train.max_nonfinite_steps must be positive"),
    ("checkpoint.resume_step", -1, "checkpoint.resume_step must be a saved step"),
])
def test_bad_fault_policy_and_nonfinite_values_are_refused(key, value, needle):
  cfg = base()
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(config.ConfigError, match=needle):
    config.validate(cfg)

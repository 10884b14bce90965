"""Out of device memory at the first train step: one line with XLA's figure and the device's, exit 2, checkpoints
untouched.

CPU cannot run out of memory for real, so XLA's error is injected: the step's first call raises it.
"""

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from galore_jax.train import out_of_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."


class FailingFirstCall:
  """A jitted step whose first call raises ``error`` (as XLA does when the buffers do not fit); ``lower`` is real."""

  def __init__(self, step, error):
    self.step, self.error, self.calls = step, error, 0

  def __call__(self, *args):
    self.calls += 1
    if self.calls == 1:
      raise self.error
    return self.step(*args)

  def lower(self, *args):
    return self.step.lower(*args)


class Device:
  device_kind = "Fake GPU"

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return {"bytes_limit": self.limit}


def step_and_args():
  step = jax.jit(lambda w, x: (w - 0.1 * (x.T @ (x @ w)), jnp.sum(x)), donate_argnums=(0,))
  return step, (jnp.ones((256, 256)), jnp.ones((64, 256)))


def test_first_step_out_of_memory_names_xla_bytes_and_the_device_memory():
  step, args = step_and_args()
  memory = step.lower(*args).compile().memory_analysis()
  want = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)
  checked = out_of_memory.checked_first_step(FailingFirstCall(step, jax.errors.JaxRuntimeError(XLA_OOM)), Device(24e9))
  with pytest.raises(out_of_memory.OutOfMemory) as caught:
    checked(*args)
  line = str(caught.value)
  assert "\n" not in line
  assert f"needs {want / 1e9:.2f} GB (XLA's memory analysis" in line and want > 256 * 256 * 4
  assert "the Fake GPU has 24.00 GB" in line
  assert "--dry_run" in line and "configs/llama7b_24gb.py" in line


def test_other_errors_pass_and_later_calls_are_the_step():
  step, args = step_and_args()
  checked = out_of_memory.checked_first_step(FailingFirstCall(step, ValueError("not memory")), Device(None))
  with pytest.raises(ValueError, match="not memory"):
    checked(*args)
  w, total = checked(*args)  # the second call is the plain step
  assert float(total) == 64 * 256 and w.shape == (256, 256)


def test_unknown_figures_still_give_one_line():
  line = out_of_memory.message(None, None, Device(None))
  assert "more than the device has" in line and "unreported amount" in line and "\n" not in line
  assert out_of_memory.is_out_of_memory(jax.errors.JaxRuntimeError(XLA_OOM))
  assert not out_of_memory.is_out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes differ"))


# train.py with the jitted train step's first call failing as XLA does when the step does not fit.
INJECT = """
import sys
import jax
from galore_jax.train import steps

make_steps = steps.make_steps

class FailingFirstCall:
  def __init__(self, step):
    self.step, self.calls = step, 0
  def __call__(self, *args):
    self.calls += 1
    if self.calls == 1:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")
    return self.step(*args)
  def lower(self, *args):
    return self.step.lower(*args)

def failing_make_steps(*args, **kwargs):
  made = make_steps(*args, **kwargs)
  return steps.Steps(train=FailingFirstCall(made.train), eval=made.eval)

steps.make_steps = failing_make_steps
sys.argv = ["train.py"] + sys.argv[1:]
import train
train.main()
"""

TINY = ["--config=configs/tiny.py", "--config.model.hidden_size=64", "--config.model.intermediate_size=128",
        "--config.model.num_hidden_layers=2", "--config.model.vocab_size=512", "--config.data.seq_len=32",
        "--config.data.max_bytes=100000", "--config.train.batch_size=4", "--config.optimizer.rank=8",
        "--config.eval.batches=1", "--config.eval.every=100", "--config.checkpoint.every=2",
        "--config.checkpoint.async_save=False", "--config.train.log_every=1"]


def snapshot(folder):
  """Every file under ``folder`` with its bytes' digest."""
  found = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return found


@pytest.mark.slow
def test_train_py_out_of_memory_at_the_first_step_is_one_line_and_keeps_the_checkpoints(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  import email
  for name in ("message.py", "parser.py", "utils.py", "header.py"):
    (corpus / f"{name}.txt").write_text(open(os.path.join(os.path.dirname(email.__file__), name)).read())
  workdir = tmp_path / "w"
  common = TINY + [f"--config.workdir={workdir}", f"--config.data.path={corpus}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
  first = subprocess.run([sys.executable, "train.py", *common, "--config.train.steps=2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  before = snapshot(workdir / "checkpoints")
  assert before
  result = subprocess.run([sys.executable, "-c", INJECT, *common, "--config.train.steps=4"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: out of device memory at the first train step: "
                                                 "it needs "), lines
  assert "GB (XLA's memory analysis of the step)" in lines[0] and "--dry_run" in lines[0]
  assert snapshot(workdir / "checkpoints") == before

"""train.py on two processes of one machine, as on two hosts: ``jax.distributed`` over localhost, gloo CPU
collectives, 4 CPU devices per process, a (data=2, fsdp=4) mesh over both. Against one process with 8
devices and the same mesh: the same loss series, and the checkpoint the two processes wrote together
restores in one process to the state the single process reached.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow

STEPS = 4
ARGS = [
    "--config.model.hidden_size=64", "--config.model.intermediate_size=128",
    "--config.model.num_hidden_layers=1", "--config.model.vocab_size=512", "--config.data.seq_len=32",
    "--config.data.max_bytes=200000", "--config.train.batch_size=16", "--config.train.grad_accum=2",
    "--config.train.warmup_steps=1", "--config.train.log_every=1", f"--config.train.steps={STEPS}",
    "--config.optimizer.rank=8", "--config.optimizer.update_proj_gap=2", "--config.eval.batches=1",
    f"--config.checkpoint.every={STEPS}", "--config.mesh.data=2", "--config.mesh.fsdp=4",
]
# float32 sums reduced in another order (gloo's all-reduce across processes, XLA's within one) differ in the
# last bits; four steps of Adam keep that near 1e-7 relative (measured); 1e-5 leaves room, and a wrong batch
# split or a missing gradient contribution moves the loss by far more.
RTOL = 1e-5
STATE_RTOL = 1e-4  # of each leaf's largest entry


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, corpus, *extra, **env):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1", "OPENBLAS_NUM_THREADS": "1", **env}
  cmd = [sys.executable, "train.py", "--config=configs/tiny.py", f"--config.workdir={workdir}",
         f"--config.data.path={corpus}", *ARGS, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=300):
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:  # one that died leaves the other waiting on a collective
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  return outputs


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def restored_state(workdir, step):
  """Parameters, optimizer state and data position of ``step``, restored in this (one) process onto its default
  device, against the trees the run's saved config builds."""
  import jax

  from galore_jax.train import checkpoint, config, restore, steps

  cfg = restore.load_run_config(workdir)
  tx = config.build_optimizer(cfg)
  abstract_params = steps.params_of(config.abstract_model(cfg))
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=1, keep=1, async_save=False,
                                 read_only=True)
  try:
    params, opt_state, meta = ckpts.restore(step, abstract_params, jax.eval_shape(tx.init, abstract_params))
  finally:
    ckpts.close()
  return jax.device_get((params, opt_state)), meta["data"]


def test_two_processes_train_as_one_and_their_checkpoint_restores_in_one(tmp_path, corpus):
  two, one = str(tmp_path / "two_processes"), str(tmp_path / "one_process")
  coordinator = {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
  outputs = finish([start(two, corpus, JAX_NUM_CPU_DEVICES="4", JAX_PROCESS_ID=str(i), **coordinator) for i in (0, 1)]
                   + [start(one, corpus, JAX_NUM_CPU_DEVICES="8")])
  assert all("cpu x8, mesh data=2 fsdp=4" in out for out in outputs)

  multi, single = metrics(two), metrics(one)
  assert [m["step"] for m in multi] == [m["step"] for m in single] == [1, 2, 3, 4, 4]  # process 0 alone writes
  for key in ("loss", "grad_norm", "eval_loss"):
    pairs = [(m[key], s[key]) for m, s in zip(multi, single) if key in s]
    assert pairs and all(key in m for m, s in zip(multi, single) if key in s)
    np.testing.assert_allclose(*zip(*pairs), rtol=RTOL, err_msg=key)

  import jax

  multi_state, multi_data = restored_state(two, STEPS)
  single_state, single_data = restored_state(one, STEPS)
  assert multi_data == single_data
  # Parameters, moments and GaLore bases: the same reduction-order differences, scaled by Adam's 1/sqrt(nu).
  for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(single_state), jax.tree.leaves(multi_state)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = np.max(np.abs(a - b), initial=0.0)
    assert worst <= STATE_RTOL * np.max(np.abs(b), initial=0.0), (jax.tree_util.keystr(path), worst)


def test_a_signal_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, corpus):
  """SIGTERM reaches process 1 only (JAX's preemption notifier takes it): both stop at the step the preemption sync
  names and save it together."""
  two = str(tmp_path / "two_processes")
  coordinator = {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2",
                 "JAX_NUM_CPU_DEVICES": "4"}
  procs = [start(two, corpus, "--config.train.steps=10000", JAX_PROCESS_ID=str(i), **coordinator) for i in (0, 1)]
  try:
    deadline = time.time() + 240
    while not (os.path.exists(os.path.join(two, "metrics.jsonl")) and metrics(two)) and time.time() < deadline:
      time.sleep(0.5)  # process 0 writes a line per step: training has started
    assert all(proc.poll() is None for proc in procs), "a process ended before the signal"
    procs[1].send_signal(signal.SIGTERM)
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert [proc.returncode for proc in procs] == [143, 143], outputs[1][-3000:] + outputs[0][-3000:]
  said = [re.search(r"stopped by SIGTERM at step (\d+); checkpoint step (\d+)", out) for out in outputs]
  assert all(said), outputs
  assert said[0].group(1) == said[1].group(1) == said[0].group(2) == said[1].group(2)  # the same step, saved
  restored_state(two, int(said[0].group(1)))


@pytest.mark.parametrize("env,needle", [
    ({"JAX_COORDINATOR_ADDRESS": "localhost:notaport", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "JAX_COORDINATOR_ADDRESS must be host:port, got 'localhost:notaport'"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "got 'two' and '0'"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "got '2' and '2'"),
])
def test_bad_multi_process_environment_is_one_line_and_exit_code_2(tmp_path, corpus, env, needle):
  proc = start(str(tmp_path / "w"), corpus, **env)
  out = proc.communicate(timeout=120)[0]
  lines = out.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out
  assert not (tmp_path / "w").exists()

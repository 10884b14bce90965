"""train.py / eval.py end to end on CPU: tiny runs, exact resume after SIGKILL, SIGTERM, export, bad input."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow

TINY = [
    "--config.model.hidden_size=64", "--config.model.intermediate_size=128", "--config.model.num_hidden_layers=2",
    "--config.model.vocab_size=512", "--config.data.seq_len=32", "--config.data.max_bytes=200000",
    "--config.train.batch_size=8", "--config.train.grad_accum=2", "--config.train.warmup_steps=5",
    "--config.train.lr=0.01", "--config.train.log_every=1", "--config.optimizer.rank=8",
    "--config.optimizer.update_proj_gap=10", "--config.eval.batches=2", "--config.eval.every=20",
    "--config.checkpoint.every=10",
]


def train_cmd(workdir, corpus, *extra, steps=30):
  return [sys.executable, "train.py", "--config=configs/tiny.py", f"--config.workdir={workdir}",
          f"--config.data.path={corpus}", f"--config.train.steps={steps}", *TINY, *extra]


def run(cmd, **kwargs):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def train_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def finish(tmp_path_factory, corpus, *extra):
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  result = run(train_cmd(workdir, corpus, *extra, steps=40))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


APOLLO = ("--config.optimizer.name=apollo_adamw",)  # random projections re-drawn from step keys, limiter norms
# exact SVD until step 15, then Haar bases drawn from step keys; first moment carried at each refresh
GOLORE = ("--config.optimizer.name=golore_adamw", "--config.optimizer.golore_switch_step=15")
Q_GALORE = ("--config.optimizer.name=q_galore_adamw",)  # int4 codes + scales, adaptive gap schedule
STACKED = ("--config.model.scan_layers=True",)  # both 7B configs' layout: [L, ...] parameters and state, one lax.scan


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
  return finish(tmp_path_factory, corpus)


@pytest.fixture(scope="module")
def finished_apollo_run(tmp_path_factory, corpus):
  return finish(tmp_path_factory, corpus, *APOLLO)


@pytest.fixture(scope="module")
def finished_golore_run(tmp_path_factory, corpus):
  return finish(tmp_path_factory, corpus, *GOLORE)


@pytest.fixture(scope="module")
def finished_q_galore_run(tmp_path_factory, corpus):
  return finish(tmp_path_factory, corpus, *Q_GALORE)


@pytest.fixture(scope="module")
def finished_stacked_run(tmp_path_factory, corpus):
  return finish(tmp_path_factory, corpus, *STACKED)


def test_loss_goes_down_and_metrics_are_complete(finished_run):
  train, evals = train_lines(finished_run)
  assert [r["step"] for r in train] == list(range(1, 41))
  assert np.mean([r["loss"] for r in train[-5:]]) < 0.8 * np.mean([r["loss"] for r in train[:5]])
  for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time"):
    assert all(key in r for r in train), key
  assert [r["step"] for r in train if "subspace_overlap" in r] == [11, 21, 31]
  assert all(0.0 <= r["subspace_overlap"] <= 1.0 for r in train if "subspace_overlap" in r)
  assert [r["step"] for r in evals] == [20, 40]
  assert all(abs(r["eval_ppl"] - np.exp(r["eval_loss"])) < 1e-3 * r["eval_ppl"] for r in evals)
  assert train[0]["lr"] == 0.0 and abs(train[5]["lr"] - 0.01) < 1e-9  # warmup from 0 over 5 steps
  assert os.listdir(os.path.join(finished_run, "tensorboard"))


@pytest.mark.parametrize("reference_run,extra", [("finished_run", ()), ("finished_apollo_run", APOLLO),
                                               ("finished_golore_run", GOLORE), ("finished_q_galore_run", Q_GALORE),
                                               ("finished_stacked_run", STACKED)])
def test_resume_after_sigkill_reproduces_the_loss_series(tmp_path, corpus, request, reference_run, extra):
  finished_run = request.getfixturevalue(reference_run)
  workdir = str(tmp_path / "killed")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
  proc = subprocess.Popen(train_cmd(workdir, corpus, *extra, steps=40), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  checkpoint_20 = os.path.join(workdir, "checkpoints", "20")
  deadline = time.time() + 300
  while not os.path.exists(checkpoint_20) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(checkpoint_20), "the run never reached its step-20 checkpoint"
  killed_at = len(train_lines(workdir)[0])
  assert killed_at < 40, "the run finished before it was killed"

  result = run(train_cmd(workdir, corpus, *extra, steps=40))
  assert result.returncode == 0, result.stderr[-3000:]
  resumed, resumed_evals = train_lines(workdir)
  reference, reference_evals = train_lines(finished_run)
  assert [r["step"] for r in resumed] == list(range(1, 41))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-identical
  assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]
  assert [r["eval_loss"] for r in resumed_evals] == [r["eval_loss"] for r in reference_evals]


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, corpus):
  workdir = str(tmp_path / "term")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
  proc = subprocess.Popen(train_cmd(workdir, corpus, steps=100000), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0 and len(open(metrics).readlines()) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert "stopped by SIGTERM" in out
  last_step = train_lines(workdir)[0][-1]["step"]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == last_step


@pytest.mark.parametrize("reference_run", ["finished_run", "finished_stacked_run"])
def test_eval_restores_reports_and_exports_to_transformers(tmp_path, request, reference_run):
  finished_run = request.getfixturevalue(reference_run)
  export = str(tmp_path / "hf")
  before = snapshot(pathlib.Path(finished_run))
  result = run([sys.executable, "eval.py", f"--workdir={finished_run}", f"--export_hf={export}",
                "--max_new_tokens=8"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert snapshot(pathlib.Path(finished_run)) == before  # eval writes nothing in the workdir
  report = json.loads(result.stdout.strip().splitlines()[-1])
  _, evals = train_lines(finished_run)
  assert report["step"] == 40
  assert abs(report["eval_loss"] - evals[-1]["eval_loss"]) < 1e-5
  assert isinstance(report["sample"], str) and report["sample"]

  torch = pytest.importorskip("torch")
  import transformers

  from galore_jax.train import load_model

  model = transformers.AutoModelForCausalLM.from_pretrained(export)
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  ids = tokenizer("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
  with torch.no_grad():
    logits = model(ids).logits
  assert logits.shape[-1] == 512
  trained, _ = load_model(finished_run)  # the checkpoint's own model: every layer exported in its place
  np.testing.assert_allclose(logits.numpy(), np.asarray(trained(ids.numpy())), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input: exit 2, one line


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--config.train.no_such_key=1"], "no_such_key"),
        (["--config.train.steps=0"], "train.steps"),
        (["--config.optimizer.rank=-4"], "optimizer.rank"),
        (["--config.optimizer.update_proj_gap=0"], "optimizer.update_proj_gap"),
        (["--config.data.seq_len=4096"], "seq_len"),
        (["--config.optimizer.name=sgd"], "optimizer.name"),
        (["--config.optimizer.name=apollo_adamw", "--config.optimizer.apollo_scale_type=row"],
         "optimizer.apollo_scale_type"),
        (["--config.optimizer.name=fira_adamw", "--config.optimizer.proj_type=full"], "fira: leaf 'layers/0/"),
        (["--config.data.path=/no/such/corpus"], "/no/such/corpus"),
        (["--config.data.tokenizer=/no/such/tokenizer"], "/no/such/tokenizer"),
        (["--config=configs/no_such_config.py"], "no_such_config.py"),
        (["--config.train.steps=abc"], "abc"),
        (["--config.train.lr=nan"], "train.lr must be a finite number"),
        (["--config.train.nonfinite=maybe"], "train.nonfinite"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, corpus, extra, needle):
  workdir = tmp_path / "w"
  result = run(train_cmd(str(workdir), corpus, *extra))
  assert result.returncode == 2, result.stderr[-2000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("error:") and needle in message


def test_empty_data_folder_is_refused(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  result = run(train_cmd(str(tmp_path / "w"), str(empty)))
  assert result.returncode == 2 and str(empty) in result.stderr.strip().splitlines()[-1]


def test_unwritable_workdir_is_refused(tmp_path, corpus):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = run(train_cmd(str(blocker / "w"), corpus))
  assert result.returncode == 2 and "workdir" in result.stderr.strip().splitlines()[-1]


def test_mismatched_checkpoint_is_refused_and_left_intact(tmp_path, corpus, finished_run):
  import shutil

  workdir = tmp_path / "copy"
  shutil.copytree(finished_run, workdir)
  before = sorted(p for p in (workdir / "checkpoints").rglob("*"))
  result = run(train_cmd(str(workdir), corpus, "--config.model.hidden_size=96", steps=60))
  assert result.returncode == 2, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert "embed" in line or "kernel" in line, line
  assert sorted(p for p in (workdir / "checkpoints").rglob("*")) == before


def test_checkpoint_of_the_other_layers_layout_names_the_flag_to_resume_with(tmp_path, corpus, finished_run):
  import shutil

  workdir = tmp_path / "stacked"
  shutil.copytree(finished_run, workdir)
  result = run(train_cmd(str(workdir), corpus, "--config.model.scan_layers=True", steps=60))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "error: checkpoint params has its layers unrolled and the config builds them stacked (model.scan_layers=True): "
      f"resume with --config.model.scan_layers=False, the layout the run was trained with (workdir {workdir})")


@pytest.mark.parametrize("saved_stacked", [True, False])
def test_layers_layout_mismatch_is_named_before_any_leaf(saved_stacked):
  import jax

  from galore_jax.train import checkpoint

  kernel = jax.ShapeDtypeStruct((4, 4), "float32")
  stacked = {"layers": {"attn": {"kernel": jax.ShapeDtypeStruct((2, 4, 4), "float32")}}}
  unrolled = {"layers": {"0": {"attn": {"kernel": kernel}}, "1": {"attn": {"kernel": kernel}}}}
  saved, target = (stacked, unrolled) if saved_stacked else (unrolled, stacked)
  with pytest.raises(checkpoint.CheckpointMismatch, match=f"resume with --config.model.scan_layers={saved_stacked},"):
    checkpoint.check_compatible("params", saved, target)
  checkpoint.check_compatible("params", saved, saved)  # the same layout: nothing to say
  # an optimizer state's "layers/0/" can be a chain index over stacked layers: its leaves are compared, no layout
  with pytest.raises(checkpoint.CheckpointMismatch, match="^checkpoint opt_state lacks layers/"):
    checkpoint.check_compatible("opt_state", saved, target)


def test_corrupt_checkpoint_is_refused(tmp_path, corpus, finished_run):
  import shutil

  workdir = tmp_path / "corrupt"
  shutil.copytree(finished_run, workdir)
  for path in (workdir / "checkpoints" / "40" / "params").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  result = run(train_cmd(str(workdir), corpus, steps=60))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      f"error: checkpoint step 40 in {workdir}/checkpoints is damaged: params/_METADATA is not readable JSON "
      "(JSONDecodeError: Expecting value: line 1 column 1 (char 0)); to resume from an earlier step: "
      f"--config.checkpoint.resume_step=30 (the later steps are moved to {workdir}/checkpoints.set_aside, not deleted)"]


def test_the_start_up_data_line_counts_epochs_and_documents_without_text():
  import train
  from configs.base import base

  cfg = base()
  cfg.train.steps, cfg.train.batch_size = 10, 4
  stats = {"train_documents": 1, "train_tokens": 1200, "train_rows": 20, "val_documents": 2, "val_tokens": 30,
           "skipped_documents": 3}  # as a token cache recorded before the sizes were
  assert train.describe_data(stats, cfg) == (
      "data: 1 document for training, 1,200 tokens (2 epochs in 10 steps of 4 sequences); 2 documents for "
      "validation, 30 tokens; 3 documents without text skipped (no string in data.text_field 'text', or only "
      "whitespace)")
  stats = {**stats, "skipped_documents": 0, "train_bytes": 5_250_000, "val_bytes": 2_749_998}
  assert train.describe_data(stats, cfg) == (
      "data: 1 document (5.2 MB) for training, 1,200 tokens (2 epochs in 10 steps of 4 sequences); 2 documents "
      "(2.7 MB) for validation, 30 tokens")
  cfg.data.path, cfg.data.max_bytes = "c4/", 8_000_000
  assert train.describe_data(stats, cfg).endswith(
      "30 tokens; data.max_bytes 8,000,000 was reached, the rest of data.path is not read (0 reads it all)")
  cfg.data.max_bytes, cfg.data.max_documents = 8_000_010, 3
  assert train.describe_data(stats, cfg).endswith("; data.max_documents 3 was reached, the rest of data.path is not "
                                                  "read (0 reads it all)")
  cfg.data.max_documents = 4
  assert train.describe_data(stats, cfg).endswith("30 tokens")
  stats.update(train_bytes=3_210_000_000, val_bytes=2_349)
  assert train.describe_data(stats, cfg).startswith("data: 1 document (3.21 GB) for training, 1,200 tokens (2 epochs "
                                                    "in 10 steps of 4 sequences); 2 documents (2 kB) for validation")


def test_a_run_already_at_train_steps_says_it_trained_nothing(tmp_path, corpus, finished_run):
  workdir = tmp_path / "again"
  shutil.copytree(finished_run, workdir)
  result = run(train_cmd(str(workdir), corpus, steps=40))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == (
      "done at step 40 (nothing to train: the checkpoint is at step 40, train.steps is 40); "
      f"checkpoint step 40 in {workdir}/checkpoints")
  assert train_lines(str(workdir)) == train_lines(finished_run)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_damaged_array_data_is_one_line_without_the_readers_tracebacks(tmp_path, corpus, finished_run, command):
  """Array data damaged under intact metadata fails inside orbax's restore, while other reads are in flight;
  those report to an event loop that has ended ("Event loop is closed" tracebacks, about every other run)."""
  import shutil

  workdir = tmp_path / "damaged"
  shutil.copytree(finished_run, workdir)
  for path in (workdir / "checkpoints" / "40" / "params" / "d").iterdir():
    path.write_bytes(b"garbage")
  cmd = (train_cmd(str(workdir), corpus, steps=60) if command == "train" else
         [sys.executable, "eval.py", f"--workdir={workdir}"])
  result = run(cmd)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]  # what else reached stderr: it failed once in a loaded full suite
  assert lines[0].startswith(f"error: checkpoint step 40 in {workdir}/checkpoints is damaged: "), lines[0]


# ----------------------------------------------------------------------------- faults


def snapshot(workdir):
  """Every file under ``workdir`` with its bytes: what a refused run must leave as it was."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_divergence_stops_logs_nan_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
  """lr=1e38: step 2 (the first with lr > 0) blows the weights up, steps 3-5 are NaN and skipped, the third in a row
  ends the run with exit 3; the NaNs are in metrics.jsonl and no checkpoint after step 2 exists."""
  workdir = tmp_path / "diverged"
  result = run(train_cmd(str(workdir), corpus, "--config.train.lr=1e38", "--config.train.warmup_steps=1",
                         "--config.checkpoint.every=2"))
  assert result.returncode == 3, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "error: training diverged: loss nan and grad_norm nan at steps 3-5 are not finite (3 in a row, "
      "train.max_nonfinite_steps=3); not saved since the last finite step; the latest checkpoint is step 2 in "
      f"{workdir}/checkpoints")
  assert "warning: step 3: loss nan, grad_norm nan are not finite: the step was skipped" in result.stderr
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert all(np.isfinite(r["loss"]) for r in rows[:2]) and all(np.isnan(r["loss"]) for r in rows[2:])
  assert [r.get("nonfinite_steps") for r in rows] == [None, None, 1, 2, 3]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


FULL_DISK_ON_SECOND_SAVE = """
import errno, os, runpy, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
original, calls = handler.JsonCheckpointHandler._save_fn, []
async def full_disk_on_second_save(self, x, directory):
  calls.append(directory)
  if len(calls) == 2:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
  return await original(self, x, directory)
handler.JsonCheckpointHandler._save_fn = full_disk_on_second_save
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_failed_save_stops_the_run_at_the_next_step_in_one_line(tmp_path, corpus):
  """The step-20 save fails in orbax's background thread (the file write raises ENOSPC, as on a full disk): the run
  stops at once (the step-20 iteration itself when the write fails that fast), long before the step-30 save, and
  step 10 stays restorable."""
  workdir = tmp_path / "full"
  result = run([sys.executable, "-c", FULL_DISK_ON_SECOND_SAVE, *train_cmd(str(workdir), corpus)[1:]])
  assert result.returncode == 4, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
  line = result.stderr.strip()
  stopped = int(line.split("; stopped at step ")[1].split(";")[0])
  assert line == (f"error: checkpoint step 20 could not be saved to {workdir}/checkpoints/20: [Errno 28] No space "
                  f"left on device: '{workdir}/checkpoints/20.orbax-checkpoint-tmp/meta.orbax-checkpoint-tmp'; "
                  f"stopped at step {stopped}; the latest checkpoint is step 10 in {workdir}/checkpoints")
  assert 20 <= stopped < 30 and train_lines(str(workdir))[0][-1]["step"] == stopped

  import jax
  from ml_collections import config_dict

  from galore_jax.train import checkpoint, config, steps

  cfg = config_dict.ConfigDict(json.loads((workdir / "config.json").read_text()))
  ckpts = checkpoint.Checkpoints(str(workdir / "checkpoints"), every=1, keep=1, read_only=True)
  assert ckpts.all_steps() == [10]
  params, meta = ckpts.restore_params(10, steps.params_of(config.abstract_model(cfg)))
  assert meta["step"] == 10 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_sigint_saves_a_checkpoint_and_exits_130_and_a_collapse_is_warned_about(tmp_path, corpus):
  """lr=1e4 collapses the model to uniform predictions with a zero gradient: a warning, training goes on; Ctrl-C
  then stops it like SIGTERM, with a checkpoint of the last step."""
  workdir = tmp_path / "int"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
  proc = subprocess.Popen(train_cmd(str(workdir), corpus, "--config.train.lr=1e4", "--config.train.warmup_steps=1",
                                    steps=100000), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  last_step = train_lines(str(workdir))[0][-1]["step"]
  assert out.strip().splitlines()[-1] == (f"stopped by SIGINT at step {last_step}; checkpoint step {last_step} in "
                                          f"{workdir}/checkpoints; run the same command to resume")
  assert "SIGINT: stopping after this step with a checkpoint" in err and "Traceback" not in err
  warnings = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "the gradient is exactly 0 at 2 logged steps in a row (loss 6.2383 = " \
      "ln(vocab_size 512): uniform predictions)" in warnings[0], err[-3000:]
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps[-1] == last_step


def test_sigterm_during_start_up_is_one_line(tmp_path, corpus):
  workdir = tmp_path / "early"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
  proc = subprocess.Popen(train_cmd(str(workdir), corpus), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (workdir / ".lock").exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)  # the lock is taken: start-up (data, model, compilation) has seconds to go
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143 and err.strip().splitlines() == [
      "stopped by SIGTERM during start-up, before the first step: nothing was saved"], err[-3000:]
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_workdir_lock_bad_metrics_and_a_torn_last_line(tmp_path, corpus, finished_run):
  """A held lock refuses a second run; a damaged metrics line refuses a resume before anything is rewritten; a torn
  last line (a run killed mid-write) is dropped with a warning, and a dead holder's lock is taken over."""
  import shutil

  from galore_jax.train import workdir as workdir_lib

  workdir = tmp_path / "shared"
  shutil.copytree(finished_run, workdir)
  lock = workdir_lib.WorkdirLock(str(workdir))
  lock.acquire()
  before = snapshot(workdir)
  result = run(train_cmd(str(workdir), corpus, steps=41))
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f"error: workdir '{workdir}' is in use by process {os.getpid()} (lock {workdir}/.lock); wait for it to finish "
      "or use another workdir"], result.stderr[-2000:]
  assert snapshot(workdir) == before
  lock.release()

  metrics = workdir / "metrics.jsonl"
  good = metrics.read_text()
  lines = good.splitlines(keepends=True)
  metrics.write_text("".join(lines[:5]) + "{not json\n" + "".join(lines[5:]))
  before = snapshot(workdir)
  result = run(train_cmd(str(workdir), corpus, steps=41))
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f"error: {metrics} line 6 is not JSON: '{{not json'"], result.stderr[-2000:]
  assert snapshot(workdir) == before  # config.json (steps 40 there, 41 asked) and metrics.jsonl as they were

  metrics.write_text(good + '{"step": 41, "loss": 3.')  # a run killed in the middle of writing step 41
  (workdir / ".lock").write_text("999999999\n")  # left by a killed run: no process holds the lock
  result = run(train_cmd(str(workdir), corpus, steps=41))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "workdir lock of process 999999999 was stale" in result.stdout
  assert "warning: metrics.jsonl: dropped its last line, which a killed run left half-written: " \
         "'{\"step\": 41, \"loss\": 3.'" in result.stderr
  assert [r["step"] for r in train_lines(str(workdir))[0]] == list(range(1, 42))
  assert (workdir / ".lock").read_text() == ""  # released


def test_a_damaged_latest_checkpoint_and_resume_step(tmp_path, corpus, finished_run):
  """A missing params/_METADATA is named as such (not "has no 'params'"), by train.py and eval.py alike; resuming from
  the step before it moves the damaged step aside and reproduces the uninterrupted run's losses."""
  import shutil

  workdir = tmp_path / "damaged"
  shutil.copytree(finished_run, workdir)
  (workdir / "checkpoints" / "40" / "params" / "_METADATA").unlink()
  result = run(train_cmd(str(workdir), corpus, steps=40))
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f"error: checkpoint step 40 in {workdir}/checkpoints is damaged: params/_METADATA is missing; to resume from an "
      f"earlier step: --config.checkpoint.resume_step=30 (the later steps are moved to {workdir}/checkpoints.set_aside,"
      " not deleted)"], result.stderr[-2000:]
  before = snapshot(workdir)
  result = run([sys.executable, "eval.py", f"--workdir={workdir}"])
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f"error: checkpoint step 40 in {workdir}/checkpoints is damaged: params/_METADATA is missing"], result.stderr
  assert snapshot(workdir) == before

  result = run(train_cmd(str(workdir), corpus, "--config.checkpoint.resume_step=30", steps=40))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (f"resuming from step 30 (checkpoint.resume_step); the later checkpoints are moved to "
          f"{workdir}/checkpoints.set_aside, not deleted") in result.stdout
  assert not (workdir / "checkpoints.set_aside" / "40" / "params" / "_METADATA").exists()
  assert (workdir / "checkpoints.set_aside" / "40" / "opt_state" / "_METADATA").exists()
  resumed, reference = train_lines(str(workdir))[0], train_lines(finished_run)[0]
  assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # steps 31-40 recomputed bit-identically
  assert sorted(os.listdir(workdir / "checkpoints")) == ["30", "40"]


def test_eval_refuses_a_workdir_without_checkpoints_or_with_a_truncated_config(tmp_path, finished_run):
  import shutil

  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(os.path.join(finished_run, "config.json"), bare / "config.json")
  result = run([sys.executable, "eval.py", f"--workdir={bare}"])
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f"error: workdir '{bare}' has no checkpoint"], result.stderr[-2000:]
  assert os.listdir(bare) == ["config.json"]  # no empty checkpoints/ left behind

  (bare / "config.json").write_text('{"model": {"preset": "llama_20m", ')
  result = run([sys.executable, "eval.py", f"--workdir={bare}"])
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
  assert result.stderr.startswith(f"error: {bare}/config.json is not a readable config: Expecting")

  (bare / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')  # a transformers model's config
  result = run([sys.executable, "eval.py", f"--workdir={bare}"])
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f"error: {bare}/config.json is not a training run's config: it has no 'model', 'data', 'train', 'optimizer'"]


@pytest.mark.parametrize("flag,message", [
    ("--export_hf={workdir}", "--export_hf '{workdir}' is inside the workdir '{workdir}', which eval.py does not "
                              "write to; give a directory outside it"),
    ("--export_hf={workdir}/hf", "--export_hf '{workdir}/hf' is inside the workdir"),
    ("--max_new_tokens=-1", "--max_new_tokens must be >= 0, got -1"),
    ("--max_new_tokens=100000", "the --prompt's "),  # its tokens plus --max_new_tokens exceed the positions
    ("--workdir={workdir}/config.json", "--workdir '{workdir}/config.json' is not a directory"),  # the last one counts
    ("--batches=-1", "--batches must be >= 0 (0: every row), got -1"),
    ("--data_path={workdir}/corpus", "--data_path '{workdir}/corpus' does not exist"),
    ("--split=train", "flag --split=train: value should be one of <validation|all>"),
    ("--text_field=", "--text_field must name a field, got ''"),
    ("--data_path={workdir}/checkpoints", "--data_path '{workdir}/checkpoints' is inside the workdir '{workdir}', "
                                          "which holds the run's files, not text to score"),
    ("held_out.jsonl", "unexpected argument 'held_out.jsonl': eval.py takes flags only"),
])
def test_eval_bad_arguments_are_one_line_and_leave_the_workdir_as_it_was(finished_run, flag, message):
  before = snapshot(pathlib.Path(finished_run))
  result = run([sys.executable, "eval.py", f"--workdir={finished_run}", flag.format(workdir=finished_run)])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith(f"error: {message.format(workdir=finished_run)}"), lines
  assert snapshot(pathlib.Path(finished_run)) == before


def test_eval_of_a_moved_corpus_without_its_token_cache_scores_the_logged_loss_and_writes_nothing(
    tmp_path, finished_run, corpus):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  shutil.rmtree(workdir / "data_cache")
  moved = shutil.copytree(corpus, tmp_path / "moved")
  before = snapshot(workdir)
  result = run([sys.executable, "eval.py", f"--workdir={workdir}", f"--data_path={moved}", "--split=validation",
                "--max_new_tokens=2"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert re.match(rf"scoring the validation split of --data_path '{re.escape(str(moved))}' \(cut by the run's "
                  r"data.max_bytes 200000\): [\d,]+ documents?, [\d,]+ tokens; 2 of its [\d,]+ batch(es)? of 4 rows"
                  r"(; [\d,]+ rows? of the corpus without text left out)?\n", result.stdout), result.stdout[:300]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert abs(report["eval_loss"] - train_lines(finished_run)[1][-1]["eval_loss"]) < 1e-5
  assert snapshot(workdir) == before  # the tokens were encoded in memory


def test_eval_of_a_run_without_validation_text_logs_no_loss(tmp_path, finished_run):
  """data.validation_fraction=0: no eval_loss at all, rather than a 0.0 that reads as a perfect model."""
  import shutil

  workdir = tmp_path / "no_validation"
  shutil.copytree(finished_run, workdir)
  cfg = json.loads((workdir / "config.json").read_text())
  cfg["data"]["validation_fraction"] = 0.0  # eval reads the run's tokenizer whatever the split: no corpus check
  (workdir / "config.json").write_text(json.dumps(cfg))
  result = run([sys.executable, "eval.py", f"--workdir={workdir}", "--max_new_tokens=2"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert (f"step 40: no token to predict in the validation split of data.path {cfg['data']['path']!r} (cut by the "
          "run's data.max_bytes 200000): the run's data.validation_fraction is 0; --split=all scores every "
          "document\n") in result.stdout
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["eval_loss"] is None and report["eval_ppl"] is None and report["eval_tokens"] == 0


@pytest.mark.parametrize("override,expected", [
    ("--config.train.stepz=3", "unknown config key train.stepz (--config.train.stepz=3); did you mean train.steps?"),
    ("--config.trian.steps=3", "unknown config key trian (--config.trian.steps=3); did you mean train?"),
    ("--config.train.steps.x=3", "config key train.steps is a value (int), not a section with key 'x' "
                                 "(--config.train.steps.x=3)"),
    ("train.steps=3", "unexpected argument 'train.steps=3': train.py takes flags only (--config=FILE, "
                      "--config.section.key=VALUE, --dry_run)"),
    ("--config.data.max_bytes=None", "flag --config.data.max_bytes=None: invalid literal for int() with base 10: "
                                     "'None' (a number cannot be set to None on the command line; the data caps "
                                     "take 0 for none)"),
])
def test_unknown_config_key_is_one_clean_line_with_a_suggestion(tmp_path, corpus, override, expected):
  result = run(train_cmd(str(tmp_path / "w"), corpus, override))
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {expected}"], result.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_readme_finetune_command_runs_with_the_checkpoints_tokenizer(tmp_path, corpus):
  """`train.py --config configs/llama3_8b_finetune.py --config.model.hf_checkpoint=DIR --config.data.path=DATA`
  on a tiny transformers Llama saved with its tokenizer: the run uses that tokenizer (none trained in the workdir)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from galore_jax.train import data

  checkpoint = tmp_path / "hf"
  documents = [open(os.path.join(corpus, name)).read() for name in sorted(os.listdir(corpus))]
  tokenizer = data.train_tokenizer(documents, 320)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(checkpoint)
  tokenizer.save_pretrained(checkpoint)
  workdir = tmp_path / "w"
  small = ["--config.data.seq_len=32", "--config.train.batch_size=4", "--config.train.grad_accum=1",
           "--config.train.steps=2", "--config.optimizer.rank=8", "--config.eval.batches=1"]
  result = run([sys.executable, "train.py", "--config", "configs/llama3_8b_finetune.py",
                f"--config.model.hf_checkpoint={checkpoint}", f"--config.data.path={corpus}",
                f"--config.workdir={workdir}", *small])
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["tokenizer"] == str(checkpoint) and not (workdir / "tokenizer").exists()
  (meta,) = (workdir / "data_cache").glob("*/meta.json")
  tokens = json.loads(meta.read_text())["tokens"]
  said = re.search(r"^data: (\d+) documents? \([\d.,]+ [kMG]B\) for training, ([\d,]+) tokens \(([\d.e-]+) epochs "
                   r"in 2 steps of 4 sequences\); (\d+) documents? \([\d.,]+ [kMG]B\) for validation, ([\d,]+) "
                   r"tokens(?:; (\d+) documents? without text skipped .*)?$", result.stdout, re.M)
  assert said and int(said[2].replace(",", "")) == tokens["train"] and int(said[5].replace(",", "")) == tokens["val"]
  blank = sum(not d.strip() for d in documents)  # the corpus's empty __init__.py
  assert int(said[1]) + int(said[4]) == len(documents) - blank and int(said[6] or 0) == blank > 0
  assert 0 < float(said[3]) < 1
  train, evals = train_lines(str(workdir))
  assert [r["step"] for r in train] == [2] and abs(evals[0]["eval_loss"] - np.log(320)) < 0.5  # a random init

  # The run keeps its own copy of the base's config.json and tokenizer: with the base checkpoint gone, eval,
  # load_model and a resume read the workdir only, and the copied tokenizer finds the same token cache.
  copy = workdir / "base_model"
  assert (copy / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()
  assert json.loads((copy / "base_model.json").read_text()) == {"hf_checkpoint": str(checkpoint),
                                                                 "tokenizer": str(checkpoint)}
  shutil.rmtree(checkpoint)
  before = snapshot(workdir)
  result = run([sys.executable, "eval.py", f"--workdir={workdir}", "--max_new_tokens=4"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert snapshot(workdir) == before  # no second token cache: the copy tokenizes as the original did
  assert abs(json.loads(result.stdout.strip().splitlines()[-1])["eval_loss"] - evals[0]["eval_loss"]) < 1e-5
  from galore_jax.train import load_model

  model, cfg = load_model(str(workdir))
  assert cfg.model.hf_checkpoint == cfg.data.tokenizer == str(copy) and model.config.vocab_size == 320
  result = run([sys.executable, "train.py", "--config", "configs/llama3_8b_finetune.py",
                f"--config.model.hf_checkpoint={copy}", f"--config.data.path={corpus}",
                f"--config.workdir={workdir}", *small[:-3], "--config.train.steps=3", *small[-2:]])
  assert result.returncode == 0, result.stderr[-3000:]
  assert [r["step"] for r in train_lines(str(workdir))[0]] == [2, 3]
  assert json.loads((copy / "base_model.json").read_text())["hf_checkpoint"] == str(checkpoint)  # never replaced
  # The copy holds no weights: a new run cannot start from it, and says so in one line.
  result = run([sys.executable, "train.py", "--config", "configs/llama3_8b_finetune.py",
                f"--config.model.hf_checkpoint={copy}", f"--config.data.path={corpus}",
                f"--config.workdir={tmp_path / 'new'}", *small])
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      f"error: model.hf_checkpoint: {copy}: neither model.safetensors nor model.safetensors.index.json found"]


# ----------------------------------------------------------------------------- load_model: a checkpoint in Python


def tree_snapshot(root):
  return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_load_model_holds_the_checkpoints_parameters_and_gives_the_runs_eval_loss(tmp_path, finished_run):
  import shutil

  import jax
  import orbax.checkpoint as ocp

  from galore_jax.optim.plan import path_str
  from galore_jax.train import config, data, load_model, steps

  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  in_flight = workdir / "checkpoints" / "50.orbax-checkpoint-tmp-1234"  # a save a live run has not finished
  in_flight.mkdir()
  before = tree_snapshot(workdir)
  model, cfg = load_model(str(workdir))
  assert tree_snapshot(workdir) == before  # read only: the in-flight save survives

  def flat(tree):  # orbax spells the layer indices as strings: compare by path
    return {path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

  flat_disk = flat(ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / "40" / "params")))
  flat_loaded = flat(steps.params_of(model))
  assert sorted(flat_disk) == sorted(flat_loaded) and "layers/1/mlp/down_proj/kernel" in flat_disk
  for key, value in flat_disk.items():
    np.testing.assert_array_equal(np.asarray(flat_loaded[key]), np.asarray(value), err_msg=key)

  dataset = data.build_data(cfg.data, workdir=str(workdir), vocab_size=config.model_config(cfg).vocab_size,
                            batch_size=cfg.train.batch_size, eval_batches=cfg.eval.batches,
                            eval_batch_size=cfg.train.batch_size // cfg.train.grad_accum, seed=cfg.seed)
  totals = [steps.loss_and_tokens(model, batch, cfg.data.packing) for batch in dataset.eval_batches]
  eval_loss = sum(float(loss) for loss, _ in totals) / sum(float(tokens) for _, tokens in totals)
  assert abs(eval_loss - train_lines(finished_run)[1][-1]["eval_loss"]) < 1e-5  # train.py's step-40 eval

  older, _ = load_model(str(workdir), step=30)
  assert not np.array_equal(np.asarray(older.embed.embedding[...]), np.asarray(model.embed.embedding[...]))


def test_load_model_refuses_what_is_not_there(tmp_path, finished_run):
  from galore_jax.train import RunNotLoadable, load_model

  with pytest.raises(RunNotLoadable, match=r"step 7 is not among the saved steps \[30, 40\]"):
    load_model(finished_run, step=7)
  with pytest.raises(RunNotLoadable, match="has no config.json"):
    load_model(str(tmp_path))
  (tmp_path / "config.json").write_text(open(os.path.join(finished_run, "config.json")).read())
  with pytest.raises(RunNotLoadable, match="has no checkpoint"):
    load_model(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json"]  # nothing created


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no closed-loop tracebacks after it
def test_load_model_names_an_unreadable_checkpoint(tmp_path, finished_run):
  import shutil

  from galore_jax.train import load_model
  from galore_jax.train.checkpoint import CheckpointDamaged

  workdir = tmp_path / "corrupt"
  shutil.copytree(finished_run, workdir)
  for path in (workdir / "checkpoints" / "40" / "params").rglob("*"):
    if path.is_file() and path.parent.name == "d":  # the array data, not the metadata
      path.write_bytes(b"garbage")
  with pytest.raises(CheckpointDamaged, match=rf"checkpoint step 40 in {workdir}/checkpoints is damaged: "):
    load_model(str(workdir))
  assert load_model(str(workdir), step=30)[1].train.steps == 40


def test_workdir_probe_survives_processes_probing_at_once(tmp_path):
  """Every process of a multi-host run checks the shared workdir at the same moment."""
  import threading

  import train

  refused = []

  def probe():
    for _ in range(1000):
      try:
        train.prepare_workdir(str(tmp_path / "w"), lock=False)
      except SystemExit as e:
        refused.append(e)

  threads = [threading.Thread(target=probe) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not refused and os.listdir(tmp_path / "w") == []

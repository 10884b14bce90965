"""train.py / eval.py end to end on CPU: tiny runs, exact resume after SIGKILL, SIGTERM, export, bad input."""

import json
import os
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small real-text corpus that does not change with the code under test: the standard library's email package."""
  import email

  folder = tmp_path_factory.mktemp("corpus")
  for dirpath, _, files in os.walk(os.path.dirname(email.__file__)):
    for name in sorted(files):
      if name.endswith(".py"):
        with open(os.path.join(dirpath, name)) as src:
          (folder / f"{os.path.basename(dirpath)}_{name}.txt").write_text(src.read())
  return str(folder)


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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
  return finish(tmp_path_factory, corpus)


@pytest.fixture(scope="module")
def finished_apollo_run(tmp_path_factory, corpus):
  return finish(tmp_path_factory, corpus, *APOLLO)


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


@pytest.mark.parametrize("reference_run,extra", [("finished_run", ()), ("finished_apollo_run", APOLLO)])
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


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
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
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by SIGTERM" in out
  last_step = train_lines(workdir)[0][-1]["step"]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps[-1] == last_step


def test_eval_restores_reports_and_exports_to_transformers(tmp_path, finished_run):
  export = str(tmp_path / "hf")
  result = run([sys.executable, "eval.py", f"--workdir={finished_run}", f"--export_hf={export}",
                "--max_new_tokens=8"])
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  _, evals = train_lines(finished_run)
  assert report["step"] == 40
  assert abs(report["eval_loss"] - evals[-1]["eval_loss"]) < 1e-5
  assert isinstance(report["sample"], str) and report["sample"]

  torch = pytest.importorskip("torch")
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(export)
  tokenizer = transformers.AutoTokenizer.from_pretrained(export)
  ids = tokenizer("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
  with torch.no_grad():
    logits = model(ids).logits
  assert logits.shape[-1] == 512 and torch.isfinite(logits).all()


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


def test_corrupt_checkpoint_is_refused(tmp_path, corpus, finished_run):
  import shutil

  workdir = tmp_path / "corrupt"
  shutil.copytree(finished_run, workdir)
  for path in (workdir / "checkpoints" / "40" / "params").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  result = run(train_cmd(str(workdir), corpus, steps=60))
  assert result.returncode == 2, result.stderr[-2000:]
  assert "checkpoint" in result.stderr.strip().splitlines()[-1]

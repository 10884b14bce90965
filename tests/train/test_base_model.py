"""A run's copy of its base checkpoint's config.json and tokenizer (``workdir/base_model``): what is copied when,
and how a restored config is pointed at it. The whole path (train, delete the base, eval, load, resume) is
``test_train.py::test_readme_finetune_command_runs_with_the_checkpoints_tokenizer``."""

import json

import pytest

from configs.base import base
from galore_jax.train import base_model, data

DOCUMENTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nprint(os.sep)\n"]


@pytest.fixture(scope="module")
def tokenizer():
  return data.train_tokenizer(DOCUMENTS, 300)


def run_config(workdir, hf_checkpoint=None, tokenizer_dir=None):
  cfg = base()
  cfg.workdir, cfg.model.hf_checkpoint, cfg.data.tokenizer = str(workdir), hf_checkpoint, tokenizer_dir
  return cfg


def hf_directory(path, tokenizer, hidden_size=64):
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden_size}))
  tokenizer.save_pretrained(path)
  return str(path)


def test_a_run_without_outside_inputs_writes_no_copy(tmp_path, tokenizer):
  cfg = run_config(tmp_path / "w")
  base_model.save_copy(cfg, tokenizer)
  assert not (tmp_path / "w").exists()
  base_model.use_copy(cfg)
  assert cfg.model.hf_checkpoint is None and cfg.data.tokenizer is None


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_the_copy_holds_what_the_run_read_and_restores_the_same_tokens(tmp_path, tokenizer, with_checkpoint):
  source = hf_directory(tmp_path / "hf", tokenizer)
  cfg = run_config(tmp_path / "w", source if with_checkpoint else None, source)
  base_model.save_copy(cfg, data.load_tokenizer(source))
  copy = tmp_path / "w" / "base_model"
  assert (copy / "config.json").exists() == with_checkpoint
  if with_checkpoint:
    assert (copy / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()
  restored = data.load_tokenizer(str(copy))
  assert data.tokenizer_fingerprint(restored) == data.tokenizer_fingerprint(data.load_tokenizer(source))
  assert not [p for p in (tmp_path / "w").iterdir() if p.name != "base_model"]  # no temporary left

  base_model.use_copy(cfg)
  assert cfg.data.tokenizer == str(copy)
  assert cfg.model.hf_checkpoint == (str(copy) if with_checkpoint else None)


def test_the_copy_is_never_replaced(tmp_path, tokenizer):
  """A resume from another base (or from the copy itself) keeps the record of what the run started from."""
  first = hf_directory(tmp_path / "first", tokenizer)
  second = hf_directory(tmp_path / "second", tokenizer, hidden_size=128)
  base_model.save_copy(run_config(tmp_path / "w", first, first), tokenizer)
  copy = tmp_path / "w" / "base_model"
  base_model.save_copy(run_config(tmp_path / "w", second, second), tokenizer)
  base_model.save_copy(run_config(tmp_path / "w", str(copy), str(copy)), tokenizer)
  assert json.loads((copy / "config.json").read_text())["hidden_size"] == 64
  assert json.loads((copy / "base_model.json").read_text()) == {"hf_checkpoint": first, "tokenizer": first}


@pytest.mark.parametrize("record", [None, "not json", "[1, 2]"])
def test_a_workdir_without_a_complete_copy_keeps_the_original_paths(tmp_path, record):
  """Runs from before the copy existed, or a copy cut short before its record was written."""
  copy = tmp_path / "w" / "base_model"
  copy.mkdir(parents=True)
  (copy / "config.json").write_text("{}")
  if record is not None:
    (copy / "base_model.json").write_text(record)
  cfg = run_config(tmp_path / "w", "/models/base", "/models/base")
  base_model.use_copy(cfg)
  assert cfg.model.hf_checkpoint == cfg.data.tokenizer == "/models/base"

"""eval.py's text: the run's validation split or other text, with the run's tokenizer, never writing the workdir."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from galore_jax.train import data, eval_data
from tests.train import test_data
from tests.train.test_data import VOCAB, build, docs, make_config, read_again


def snapshot(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


folder = test_data.folder  # the corpus: one .txt file per document of docs()


@pytest.fixture
def run(folder, tmp_path):
  """A run's corpus and workdir as train.py leaves them: its trained tokenizer and its token cache."""
  workdir = tmp_path / "workdir"
  return folder, workdir, build(folder, workdir, eval_batches=None)


def score(corpus, workdir, batches=None, **kwargs):
  return eval_data.build_eval_data(make_config(str(corpus)), workdir=str(workdir), vocab_size=VOCAB, batch_size=3,
                                   batches=batches, **kwargs)


def assert_same_batches(got, expected):
  assert len(got) == len(expected) > 0
  for g, e in zip(got, expected):
    assert g.keys() == e.keys()
    for key in g:
      np.testing.assert_array_equal(g[key], e[key], err_msg=key)


@pytest.mark.parametrize("token_cache", ["kept", "deleted"])
def test_the_validation_split_is_what_training_scored_and_the_workdir_is_only_read(run, token_cache, monkeypatch):
  corpus, workdir, built = run
  if token_cache == "deleted":
    shutil.rmtree(workdir / "data_cache")
  else:  # the cache records the corpus's files, unchanged since: it is not read again
    monkeypatch.setattr(data, "open_corpus", read_again)
  before = snapshot(workdir)
  scored = score(corpus, workdir)
  assert_same_batches(scored.batches, built.eval_batches)
  assert data.tokenizer_fingerprint(scored.tokenizer) == data.tokenizer_fingerprint(built.tokenizer)
  assert (scored.documents, scored.tokens) == (built.stats["val_documents"], built.stats["val_tokens"])
  assert snapshot(workdir) == before  # no token cache written, no tokenizer trained


def test_a_moved_corpus_and_a_file_of_the_validation_documents_score_the_same(run, tmp_path):
  corpus, workdir, built = run
  moved = tmp_path / "moved"
  shutil.move(corpus, moved)
  with pytest.raises(ValueError, match="does not exist; if the corpus moved, eval.py --data_path names where"):
    score(corpus, workdir)
  scored = score(corpus, workdir, data_path=str(moved), split="validation")
  assert_same_batches(scored.batches, built.eval_batches)
  assert scored.source == f"the validation split of --data_path {str(moved)!r}"

  _, validation = data.split_documents(docs(), 0.2)  # the split rule applied here, not by the code under test
  held_out = tmp_path / "held_out.jsonl"
  held_out.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in validation))
  scored = score(corpus, workdir, data_path=str(held_out), text_field="body")  # all documents by default
  assert scored.source == f"all of --data_path {str(held_out)!r}"
  assert_same_batches(scored.batches, built.eval_batches)
  with pytest.raises(ValueError, match=r"^--text_field 'text' is not a column of the json files"):
    score(corpus, workdir, data_path=str(held_out))


def test_all_documents_are_each_encoded_plus_eos_and_batches_limits_the_rows(run):
  corpus, workdir, built = run
  scored = score(corpus, workdir, split="all")
  expected_N = np.concatenate([built.tokenizer(doc, add_special_tokens=False)["input_ids"] + [built.eos_id]
                               for doc in docs()])  # the slow tokenizer call, not the batch encoder eval uses
  assert scored.tokens == expected_N.size and scored.documents == len(docs())
  inputs = np.concatenate([b["inputs"][b["loss_mask"][:, 0] > 0] for b in scored.batches])
  assert scored.rows == len(inputs) == -(-(expected_N.size - 1) // 16)  # packed rows of seq_len 16
  np.testing.assert_array_equal(inputs[:, 0], expected_N[:-1:16])
  first_two = score(corpus, workdir, batches=2, split="all").batches
  assert_same_batches(first_two, scored.batches[:2])


@pytest.mark.parametrize("packing", [True, False])
def test_the_reading_stops_once_the_batches_asked_for_are_full(run, tmp_path, packing):
  """Encoding stops after the chunk of documents (256) that fills the batches, and the text scored is the
  documents those batches are made of: the whole text's first batches, reported as its first documents."""
  corpus, workdir, built = run
  rows = [{"text": " "}] + [{"text": doc} for doc in docs(700)] + [{"text": None}]  # rows without text: first, last
  held_out = tmp_path / "held_out.jsonl"
  held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
  config = make_config(str(corpus), packing=packing)

  def score_held_out(batches):
    return eval_data.build_eval_data(config, workdir=str(workdir), vocab_size=VOCAB, batch_size=3, batches=batches,
                                     data_path=str(held_out))

  whole, first = score_held_out(None), score_held_out(2)
  lengths = np.array([len(built.tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1 for doc in docs(700)])
  needed = int(np.searchsorted(np.cumsum(lengths), 2 * 3 * config.seq_len + 1)) + 1 if packing else 2 * 3
  assert (whole.complete, whole.documents, whole.skipped) == (True, 700, 2)
  assert (first.complete, first.documents, first.tokens, first.skipped) == (False, needed, lengths[:needed].sum(), 1)
  assert len(first.batches) == 2 and len(whole.batches) > 2
  assert_same_batches(first.batches, whole.batches[:2])
  rows[needed + 1:] = []  # only the documents the batches need: the whole text is read, and the report says so
  held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
  again = score_held_out(2)
  assert (again.complete, again.documents) == (True, needed)
  assert_same_batches(again.batches, first.batches)


def test_the_scoring_line_says_what_is_scored():
  import eval as eval_py

  scored = eval_data.EvalData(None, 2, batches=[{}] * 2, source="all of --data_path 'x.jsonl'", documents=256,
                              tokens=20_480, rows=1280, skipped=1, complete=True, empty_because=None)
  assert eval_py.scoring_line(scored, 16) == (
      "scoring all of --data_path 'x.jsonl': 256 documents, 20,480 tokens; 2 of its 80 batches of 16 rows; 1 row of "
      "the corpus without text left out")
  assert eval_py.scoring_line(scored._replace(complete=False, skipped=0), 16) == (
      "scoring all of --data_path 'x.jsonl': its first 256 documents (20,480 tokens) fill the 2 batches of 16 rows "
      "asked for")
  assert eval_py.scoring_line(scored._replace(complete=False, documents=1, batches=[{}]), 16) == (
      "scoring all of --data_path 'x.jsonl': its first document (20,480 tokens) fills the 1 batch of 16 rows asked for"
      "; 1 row of the corpus without text left out")


def test_a_run_with_its_own_tokenizer_reads_it_and_a_trained_one_must_be_there(run, tmp_path):
  corpus, workdir, built = run
  shutil.move(workdir / "tokenizer", tmp_path / "base_tokenizer")
  before = snapshot(workdir)
  with pytest.raises(ValueError, match="has no tokenizer/: the run trained its tokenizer there"):
    score(corpus, workdir)
  assert snapshot(workdir) == before  # not trained again
  scored = eval_data.build_eval_data(make_config(str(corpus), tokenizer=str(tmp_path / "base_tokenizer")),
                                     workdir=str(workdir), vocab_size=VOCAB, batch_size=3, batches=None)
  assert_same_batches(scored.batches, built.eval_batches)  # the same tokenizer, so the token cache is found


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="train"), "split must be one of validation, all, got 'train'"),
    (dict(batches=0), "batch_size and batches must be positive, got 3 and 0"),
])
def test_bad_arguments_are_value_errors_naming_them(run, kwargs, message):
  corpus, workdir, _ = run
  with pytest.raises(ValueError, match=message):
    score(corpus, workdir, **kwargs)


def test_text_without_tokens_to_predict_says_why(run, tmp_path):
  corpus, workdir, _ = run
  one = tmp_path / "one.txt"
  one.write_text("x = 1\n" + " " * 40)  # one document: the split cuts it at the line, the validation part is blank
  scored = score(corpus, workdir, data_path=str(one), split="validation")
  assert scored.batches == [] and scored.empty_because == ("its validation split is empty; --split=all scores every "
                                                           "document")
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"text": 5}\n{"text": "  "}\n')
  with pytest.raises(ValueError, match=r"^--data_path '[^']*rows.jsonl' has no text: none of its 2 rows holds text in "
                                       r"--text_field 'text'$"):
    score(corpus, workdir, data_path=str(rows))
  scored = score(corpus, workdir, data_path=str(corpus), split="all")
  assert scored.empty_because is None and scored.skipped == 0 and scored.source == f"all of --data_path {str(corpus)!r}"
  capped = eval_data.build_eval_data(make_config(str(corpus), max_documents=30), workdir=str(workdir),
                                     vocab_size=VOCAB, batch_size=3, batches=None, split="all")
  assert capped.documents == 30 and capped.source.endswith("(cut by the run's data.max_documents 30)")

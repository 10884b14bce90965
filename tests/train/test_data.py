"""The data pipeline: corpus kinds, the embedded corpus, split, tokenizer and token caches, rows, batches, errors."""

import hashlib
import itertools
import json
import os
import re
import shutil

import numpy as np
import pytest
from ml_collections import config_dict

from galore_jax.train import data
from galore_jax.train import workdir as workdir_lib

PROSE = [
    "The quick brown fox jumps over the lazy dog.\nIt was not amused.\n",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "for i in range(10):\n    if i % 2:\n        print(i)\n",
    "A man, a plan, a canal: Panama. Madam, in Eden, I'm Adam.\n",
    "with open('f.txt') as f:\n    lines = f.readlines()\n",
]
VOCAB = 320


def docs(n=40):
  """``n`` distinct small documents."""
  return [f"# document {i}\n" + PROSE[i % len(PROSE)] * (1 + i % 3) for i in range(n)]


def make_config(path=None, **overrides):
  c = config_dict.ConfigDict(dict(path=path, tokenizer=None, seq_len=16, packing=True, validation_fraction=0.2,
                                  max_documents=None, max_bytes=None, text_field="text"))
  c.update(overrides)
  return c


def build(path, workdir, **overrides):
  kwargs = dict(vocab_size=overrides.pop("vocab_size", VOCAB), batch_size=overrides.pop("batch_size", 4),
                eval_batch_size=overrides.pop("eval_batch_size", 3), eval_batches=overrides.pop("eval_batches", 2),
                seed=overrides.pop("seed", 0), progress=overrides.pop("progress", None))
  return data.build_data(make_config(path, **overrides), workdir=str(workdir), **kwargs)


@pytest.fixture
def folder(tmp_path):
  """A folder of one-document .txt files."""
  root = tmp_path / "corpus"
  root.mkdir()
  for i, doc in enumerate(docs()):
    (root / f"{i:03d}.txt").write_text(doc)
  return root


def stream(rows: data.Rows) -> np.ndarray:
  return rows.tokens_N


# ----------------------------------------------------------------------------- loading


def test_text_file_is_one_document(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("first para\n\nsecond para\n")
  assert data.load_documents(str(path)).documents == ["first para\n\nsecond para\n"]


def test_mixed_folder(tmp_path):
  import datasets

  root = tmp_path / "mixed"
  (root / "sub").mkdir(parents=True)
  (root / "b.txt").write_text("text file b\n")
  (root / "sub" / "a.txt").write_text("text file a\n")
  (root / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["j1", "j2"])))
  datasets.Dataset.from_dict({"text": ["p1", "p2", "  "], "n": [1, 2, 3]}).to_parquet(str(root / "d.parquet"))
  (root / ".hidden.txt").write_text("hidden\n")
  (root / "notes.md").write_text("ignored\n")
  corpus = data.load_documents(str(root), cache_dir=str(tmp_path / "hf"))
  assert corpus == (["text file b\n", "text file a\n", "j1", "j2", "p1", "p2"], 1)  # the blank parquet row


def test_text_field(tmp_path):
  (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
  assert data.load_documents(str(tmp_path / "c.jsonl"), text_field="body", cache_dir=str(tmp_path / "hf")) == (
      ["hello"], 0)
  with pytest.raises(ValueError, match="'text'"):
    data.load_documents(str(tmp_path / "c.jsonl"), cache_dir=str(tmp_path / "hf"))


def test_json_files_with_different_columns_are_read_each_alone(tmp_path):
  """JSON files from different sources (C4's text/timestamp/url, one's own text-only rows) do not make one table
  for ``datasets``: each is then read alone, in the same order; a file without the text field is named."""
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.jsonl").write_text('{"text": "a1", "url": "u"}\n{"text": "a2", "url": "v"}\n')
  (tmp_path / "c" / "b.jsonl").write_text('{"text": "b1", "id": 7}\n')
  (tmp_path / "c" / "c.jsonl").write_text('{"text": "c1", "url": 3}\n')
  assert data.load_documents(str(tmp_path / "c")) == (["a1", "a2", "b1", "c1"], 0)
  (tmp_path / "c" / "d.jsonl").write_text('{"body": "d1"}\n')
  with pytest.raises(ValueError, match=r"^data.text_field 'text' is not a column of the json file '[^']*d\.jsonl' "
                                       r"\(columns: \['body'\]\)$"):
    data.load_documents(str(tmp_path / "c"))


def test_save_to_disk(tmp_path):
  import datasets

  datasets.Dataset.from_dict({"text": ["x1", "x2"]}).save_to_disk(str(tmp_path / "ds"))
  assert data.load_documents(str(tmp_path / "ds")).documents == ["x1", "x2"]
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                        "test": datasets.Dataset.from_dict({"text": ["u"]})}).save_to_disk(str(tmp_path / "dd"))
  assert data.load_documents(str(tmp_path / "dd")).documents == ["t"]


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_text_and_json_files_read_as_their_contents(tmp_path, compression):
  import bz2
  import gzip
  import lzma

  def write_compressed(path, text):
    with {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression](f"{path}.{compression}", "wt") as f:
      f.write(text)

  rows = [json.dumps({"text": d, "url": f"u{i}"}) for i, d in enumerate(docs(6))]
  plain, packed = tmp_path / "plain", tmp_path / "packed"
  for root, write in ((plain, lambda path, text: path.write_text(text)), (packed, write_compressed)):
    root.mkdir()
    write(root / "c4-train.00000-of-01024.json", "\n".join(rows[:4]) + "\n")  # C4's shards as downloaded
    write(root / "more.jsonl", "\n".join(rows[4:]) + "\n")
    write(root / "notes.txt", "a text document\n")
  assert sorted(os.listdir(packed)) == sorted(f"{name}.{compression}" for name in os.listdir(plain))
  assert data.load_documents(str(packed)) == data.load_documents(str(plain)) == (["a text document\n"] + docs(6), 0)
  assert data.load_documents(str(packed / f"more.jsonl.{compression}")).documents == docs(6)[4:]


def test_a_damaged_compressed_file_is_named(tmp_path):
  import gzip

  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:-20])  # cut short
  with pytest.raises(ValueError, match=r"file '[^']*a\.jsonl\.gz' cannot be read \(Compressed file ended"):
    build(str(tmp_path / "c"), tmp_path / "w")
  (tmp_path / "c" / "a.jsonl.gz").write_bytes(b'{"text": "not gzip"}\n')
  with pytest.raises(ValueError, match=r"file '[^']*a\.jsonl\.gz' cannot be read \(Not a gzipped file"):
    build(str(tmp_path / "c"), tmp_path / "w")
  (tmp_path / "c" / "a.jsonl.gz").write_bytes(deflate_error_gzip())
  with pytest.raises(ValueError, match=r"file '[^']*a\.jsonl\.gz' cannot be read \(Error -3 while decompressing"):
    build(str(tmp_path / "c"), tmp_path / "w")


def deflate_error_gzip() -> bytes:
  """A gzip file with one byte changed so that zlib, not gzip's own checks, finds the damage (zlib.error)."""
  import gzip
  import zlib

  blob = gzip.compress(b"".join(b'{"text": "document %d"}\n' % i for i in range(200)), mtime=0)
  for position in range(20, len(blob)):
    damaged = blob[:position] + bytes([blob[position] ^ 0xFF]) + blob[position + 1:]
    try:
      gzip.decompress(damaged)
    except zlib.error:
      return damaged
    except (OSError, EOFError):
      continue
  raise AssertionError("no one-byte change of this gzip file makes zlib fail")


def test_parquet_files_are_read_in_place_in_order(tmp_path):
  """Parquet shards (FineWeb's) are read a batch of rows at a time without a copy: the documents are pyarrow's
  own reading of the text column, file after file in path order, across row groups."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  (tmp_path / "c" / "sub").mkdir(parents=True)
  texts = {name: [f"{name} document {i}\n" * (1 + i % 4) for i in range(2500)] for name in ("b", "a", "sub/c")}
  for name, column in texts.items():
    pq.write_table(pa.table({"id": range(len(column)), "text": column}), tmp_path / "c" / f"{name}.parquet",
                   row_group_size=700)
  corpus = data.load_documents(str(tmp_path / "c"), cache_dir=str(tmp_path / "hf"))
  expected = [t for name in ("a.parquet", "b.parquet", "sub/c.parquet")
              for t in pq.read_table(tmp_path / "c" / name).column("text").to_pylist()]
  assert corpus == (expected, 0) and len(expected) == 7500
  assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.arrow"))  # no copy


def test_a_parquet_file_without_the_column_or_with_a_damaged_page_is_named(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"body": ["x"] * 10}), tmp_path / "other.parquet")
  with pytest.raises(ValueError, match=r"^data.text_field 'text' is not a column of the parquet file '[^']*other"
                                       r"\.parquet' \(columns: \['body'\]\)$"):
    data.load_documents(str(tmp_path / "other.parquet"))
  pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(3000)]}), tmp_path / "a.parquet",
                 row_group_size=500)
  damaged = bytearray((tmp_path / "a.parquet").read_bytes())
  damaged[len(damaged) // 2:len(damaged) // 2 + 200] = bytes(200)  # a page in the middle; the footer is intact
  (tmp_path / "a.parquet").write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match=r"^data.path '[^']*a\.parquet': file '[^']*a\.parquet' cannot be read "
                                       r"\(OSError: "):
    build(str(tmp_path / "a.parquet"), tmp_path / "w")


def test_a_file_rewritten_during_a_first_start_stops_it(tmp_path):
  """The passes over a corpus must read the same documents: a parquet file (read in place) changed between them,
  or a corpus whose document count changed, is refused, not mixed across the split."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = tmp_path / "a.parquet"
  pq.write_table(pa.table({"text": docs(20)}), path)
  with data.open_corpus(data.data_spec(make_config(str(path)))) as corpus:
    train, val, _ = data.split_corpus(corpus, 0.2)
    assert list(val) and list(train)
    pq.write_table(pa.table({"text": docs(21)}), path)
    with pytest.raises(ValueError, match=r"file '[^']*a\.parquet' changed while it was read; start again$"):
      list(train)
  counted = CountedRows(docs(20))
  train, val, _ = data.split_corpus(data.Corpus(counted), 0.2)
  counted.rows = docs(19)
  with pytest.raises(ValueError, match=r"^the corpus changed while it was read: its documents are no longer the 20 "):
    list(val)


def test_build_from_each_kind(tmp_path):
  import datasets

  corpus = docs(30)
  (tmp_path / "t").mkdir()
  for i, d in enumerate(corpus):
    (tmp_path / "t" / f"{i:02d}.txt").write_text(d)
  (tmp_path / "j.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in corpus))
  datasets.Dataset.from_dict({"text": corpus}).to_parquet(str(tmp_path / "p.parquet"))
  datasets.Dataset.from_dict({"text": corpus}).save_to_disk(str(tmp_path / "s"))
  tokens = []
  for name in ("t", "j.jsonl", "p.parquet", "s"):
    built = build(str(tmp_path / name), tmp_path / f"w_{name}")
    assert built.stats["train_documents"] + built.stats["val_documents"] == 30
    tokens.append(built.train.rows.tokens_N)
  for other in tokens[1:]:  # same documents, same order → same tokenizer and tokens
    np.testing.assert_array_equal(tokens[0], other)


def test_caps(tmp_path):
  assert data.cap_documents(["aaaa", "bbbb", "cccc"], None, 6) == ["aaaa", "bb"]
  assert data.cap_documents(["aaaa", "bbbb", "cccc"], 2, None) == ["aaaa", "bbbb"]
  assert data.cap_documents(["aaaa", "é" * 4], None, 7) == ["aaaa", "é"]  # whole UTF-8 characters only


# ----------------------------------------------------------------------------- embedded corpus


@pytest.fixture(scope="module")
def stdlib_builds(tmp_path_factory):
  work = tmp_path_factory.mktemp("stdlib")
  kwargs = dict(vocab_size=512, batch_size=4, eval_batch_size=4, eval_batches=2, seed=0)
  c = make_config(None, max_bytes=300_000, seq_len=64, validation_fraction=0.05)
  return data.build_data(c, workdir=str(work / "a"), **kwargs), data.build_data(c, workdir=str(work / "b"), **kwargs)


def embedded_documents(**caps):
  with data.open_corpus(data.data_spec(make_config(None, **caps))) as corpus:
    return list(corpus.rows())


def test_embedded_corpus_is_python_source():
  documents = embedded_documents(max_bytes=300_000)
  text = "".join(documents)
  assert "def " in text and "import " in text and "class " in text
  assert 0 < len(text.encode()) <= 300_000
  assert None not in documents and documents == embedded_documents(max_bytes=300_000)


def test_rows_without_text_are_left_out_and_counted(tmp_path):
  rows = [{"text": "kept one"}, {"text": None}, {"text": "   "}, {"id": 3}, {"text": "kept two"}]
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
  built = build(str(tmp_path / "c.jsonl"), tmp_path / "w", validation_fraction=0.5)
  assert built.stats["skipped_documents"] == 3
  assert built.stats["train_documents"] + built.stats["val_documents"] == 2


def test_embedded_corpus_build_is_deterministic(stdlib_builds):
  a, b = stdlib_builds
  assert a.stats == b.stats and a.stats["vocab_size"] == 512 and a.stats["val_documents"] > 0
  np.testing.assert_array_equal(a.train.rows.tokens_N, b.train.rows.tokens_N)
  for x, y in zip(a.eval_batches, b.eval_batches):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert "def" in a.tokenizer.decode(a.train.rows.tokens_N[:2000].tolist())


# ----------------------------------------------------------------------------- split


def test_split_is_deterministic_and_disjoint():
  corpus = docs(200)
  train, val = data.split_documents(corpus, 0.1)
  assert (train, val) == data.split_documents(list(corpus), 0.1)
  assert not set(train) & set(val) and sorted(train + val) == sorted(corpus)
  assert 5 <= len(val) <= 40
  assert [d for d in corpus if d in set(val)] == val  # order kept
  # by content: shuffling the corpus does not move any document across sides
  shuffled = list(reversed(corpus))
  assert set(data.split_documents(shuffled, 0.1)[1]) == set(val)


def test_split_fallbacks():
  train, val = data.split_documents(docs(3), 0.01)  # too few documents for a 1% hash split
  assert len(val) == 1 and len(train) == 2
  train, val = data.split_documents(["line one\nline two\nline three\nline four\n"], 0.3)
  assert train == ["line one\nline two\n"] and val == ["line three\nline four\n"]
  assert data.split_documents(docs(3), 0.0) == (docs(3), [])


# ----------------------------------------------------------------------------- reading on demand


class CountedRows:
  """A corpus's rows that count how many were pulled, per pass."""

  def __init__(self, rows):
    self.rows, self.pulled = rows, []

  def __call__(self):
    self.pulled.append(0)
    for row in self.rows:
      self.pulled[-1] += 1
      yield row


@pytest.mark.parametrize("documents, fraction", [(docs(200), 0.1), (docs(3), 0.01), (docs(3), 0.99), (docs(5), 0.0),
                                                 (["line one\nline two\nline three\n"], 0.3), ([], 0.2)])
def test_the_split_read_on_demand_is_the_split_in_memory(documents, fraction):
  rows = [None, *[x for doc in documents for x in (doc, "  ", 7)]]  # rows without text between the documents
  corpus = data.Corpus(CountedRows(rows))
  train, val, skipped = data.split_corpus(corpus, fraction)
  assert (list(train), list(val)) == data.split_documents(documents, fraction)
  assert (len(train), len(val), skipped) == (len(list(train)), len(list(val)), 1 + 2 * len(documents))
  assert (list(train), list(val)) == data.split_documents(documents, fraction)  # each pass reads the same


def test_the_caps_stop_the_reading():
  counted = CountedRows(["a", None, "b", "  ", "c", "d"])
  assert list(data.Corpus(counted, max_documents=2).rows()) == ["a", None, "b"] and counted.pulled == [3]
  assert list(data.Corpus(counted, max_bytes=2).rows()) == ["a", None, "b"] and counted.pulled[-1] == 3
  assert list(data.Corpus(counted, max_bytes=3)) == ["a", "b", "c"]
  assert list(data.Corpus(lambda: ["aaaa", "é" * 4], max_bytes=7)) == ["aaaa", "é"]


def test_encoding_pulls_one_chunk_of_documents_at_a_time(folder, tmp_path):
  tokenizer = build(str(folder), tmp_path / "w").tokenizer
  counted = CountedRows(docs(10))
  chunks = data.encoded_chunks(tokenizer, counted(), eos_id=2, chunk=4)
  tokens, lengths_D = next(chunks)
  assert counted.pulled == [4] and lengths_D.size == 4
  rest = list(chunks)
  expected_N, expected_offsets = data.tokenize_documents(tokenizer, docs(10), 2, chunk=10)
  np.testing.assert_array_equal(np.concatenate([tokens] + [t for t, _ in rest]), expected_N)
  np.testing.assert_array_equal(np.cumsum(np.concatenate([lengths_D] + [n for _, n in rest])), expected_offsets[1:])


@pytest.mark.parametrize("sizes", [[], [0], [5, 0, 300, 1]])
def test_a_split_saved_chunk_by_chunk_is_what_np_save_writes(tmp_path, sizes):
  rng = np.random.default_rng(0)
  chunks = [(rng.integers(0, 50_000, n).astype(np.int32), np.array([n], np.int64)) for n in sizes]
  count = data.token_cache.save_split(str(tmp_path), "train", iter(chunks))
  expected = np.concatenate([np.zeros(0, np.int32)] + [t for t, _ in chunks])
  np.save(tmp_path / "reference.npy", expected)
  assert count == expected.size
  assert (tmp_path / "train_tokens.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
  np.testing.assert_array_equal(np.load(tmp_path / "train_offsets.npy"), np.cumsum([0, *sizes]))


def test_a_first_start_caches_what_the_in_memory_pipeline_encodes(tmp_path):
  """The tokens a first start streams into its cache are those of the documents read, split and encoded in memory
  (rows without text and a cap included)."""
  rows = [{"text": doc} if i % 7 else {"text": " "} for i, doc in enumerate(docs(60))]
  (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
  built = build(str(tmp_path / "c.jsonl"), tmp_path / "w", max_documents=45, validation_fraction=0.2)
  documents, _ = data.load_documents(str(tmp_path / "c.jsonl"))
  train, val = data.split_documents(documents[:45], 0.2)
  (cache,) = (tmp_path / "w" / "data_cache").iterdir()
  for name, split in (("train", train), ("val", val)):
    tokens_N, offsets_D1 = data.tokenize_documents(built.tokenizer, split, built.eos_id)
    np.testing.assert_array_equal(np.load(cache / f"{name}_tokens.npy"), tokens_N)
    np.testing.assert_array_equal(np.load(cache / f"{name}_offsets.npy"), offsets_D1)
  assert built.stats["skipped_documents"] == sum(1 for i in range(52) if i % 7 == 0)  # rows read before the cap
  assert (built.stats["train_documents"], built.stats["val_documents"]) == (len(train), len(val))


# ----------------------------------------------------------------------------- tokenizer and caches


def test_a_first_start_says_what_it_does_and_a_later_start_says_it_loaded_the_cache(tmp_path, monkeypatch):
  (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs(600)))
  monkeypatch.setattr(data.token_cache, "PROGRESS_EVERY_S", 0.0)  # a line per chunk of 256 documents
  lines = []
  first = build(str(tmp_path / "c.jsonl"), tmp_path / "w", progress=lines.append, validation_fraction=0.05)
  train, val = first.stats["train_documents"], first.stats["val_documents"]
  patterns = [r"data: reading data.path '.*c.jsonl' to split, encode and cache it \(a later start on the unchanged "
              r"corpus loads the cache\)$",
              rf"data: split in \d+ s: {train} training and {val} validation documents$",
              rf"data: training a byte-level BPE of {VOCAB} tokens on the training split$",
              r"data: tokenizer trained in \d+ s$",
              rf"data: encoding the training split: 256 of {train} documents, [\d,]+ tokens, \d+ s$",
              rf"data: encoding the training split: 512 of {train} documents, [\d,]+ tokens, \d+ s$",
              rf"data: encoded the training split: {train} documents, {first.stats['train_tokens']:,} tokens in \d+ s$",
              rf"data: encoded the validation split: {val} documents, {first.stats['val_tokens']:,} tokens in \d+ s$"]
  assert len(lines) == len(patterns) and 512 < train < 600, lines
  for line, pattern in zip(lines, patterns):
    assert re.match(pattern, line), (line, pattern)
  lines.clear()
  build(str(tmp_path / "c.jsonl"), tmp_path / "w", progress=lines.append, validation_fraction=0.05)
  (cache,) = (tmp_path / "w" / "data_cache").iterdir()
  assert lines == [f"data: data.path {str(tmp_path / 'c.jsonl')!r} is unchanged since its tokens were cached: "
                   f"loaded {cache}"]


def test_tokenizer_trained_cached_and_reloadable(folder, tmp_path, monkeypatch):
  import transformers

  first = build(str(folder), tmp_path / "w")
  tok_dir = tmp_path / "w" / "tokenizer"
  tok_json = tok_dir / "tokenizer.json"
  mtime = tok_json.stat().st_mtime_ns
  assert (first.pad_id, first.bos_id, first.eos_id) == (0, 1, 2)
  assert len(first.tokenizer) <= VOCAB
  caches = os.listdir(tmp_path / "w" / "data_cache")

  def no_training(*_):
    raise AssertionError("retrained")

  def no_tokenizing(*_):
    raise AssertionError("re-tokenized")

  monkeypatch.setattr(data.tokenizer, "train_tokenizer", no_training)
  monkeypatch.setattr(data.token_cache, "encoded_chunks", no_tokenizing)
  second = build(str(folder), tmp_path / "w")
  assert tok_json.stat().st_mtime_ns == mtime and os.listdir(tmp_path / "w" / "data_cache") == caches
  np.testing.assert_array_equal(first.train.rows.tokens_N, second.train.rows.tokens_N)

  reloaded = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
  text = "def main():\n    return 0\n"
  ids = reloaded(text, add_special_tokens=False)["input_ids"]
  assert reloaded.decode(ids) == text and reloaded.eos_token == "<eos>" and reloaded.pad_token_id == 0


class ReadAgain(Exception):
  pass


def read_again(*_):
  raise ReadAgain


@pytest.mark.parametrize("change", [None, "touched", "added", "max_documents", "validation_fraction", "tokenizer"])
def test_a_later_start_reads_the_corpus_again_only_when_it_or_its_settings_changed(folder, tmp_path, monkeypatch,
                                                                                   change):
  first = build(str(folder), tmp_path / "w")
  overrides = {}
  if change == "touched":  # the same bytes, a new modification time: read again, as make would
    stat = (folder / "003.txt").stat()
    os.utime(folder / "003.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
  elif change == "added":
    (folder / "999.txt").write_text("one more document\n")
  elif change == "tokenizer":
    build(str(folder), tmp_path / "other", vocab_size=300)
    overrides = {"tokenizer": str(tmp_path / "other" / "tokenizer")}
  elif change is not None:
    overrides = {"max_documents": 30} if change == "max_documents" else {"validation_fraction": 0.3}
  monkeypatch.setattr(data, "open_corpus", read_again)
  if change is not None:
    with pytest.raises(ReadAgain):
      build(str(folder), tmp_path / "w", **overrides)
    return
  second = build(str(folder), tmp_path / "w")
  assert second.stats == first.stats
  (state,) = (tmp_path / "w" / "data_cache").glob(f"*/{data.CORPUS_STATE}")
  recorded = json.loads(state.read_text())
  for damaged in ("{", json.dumps({"state": recorded["state"]})):  # not JSON; no stats: read the corpus again
    state.write_text(damaged)
    with pytest.raises(ReadAgain):
      build(str(folder), tmp_path / "w")
  np.testing.assert_array_equal(second.train.rows.tokens_N, first.train.rows.tokens_N)
  for got, expected in zip(second.eval_batches, first.eval_batches, strict=True):
    np.testing.assert_array_equal(got["inputs"], expected["inputs"])
  assert not list(tmp_path.rglob("*.tmp-*"))


def test_documents_end_with_eos(folder, tmp_path):
  built = build(str(folder), tmp_path / "w")
  tokenizer, eos = built.tokenizer, built.eos_id
  tokens_N, offsets = data.tokenize_documents(tokenizer, ["ab cd", "", "x"], eos)
  assert offsets.tolist() == [0, offsets[1], offsets[1] + 1, offsets[3]]
  assert tokens_N[offsets[1:] - 1].tolist() == [eos] * 3
  assert tokenizer.decode(tokens_N[:offsets[1] - 1].tolist()) == "ab cd"


def test_given_tokenizer_and_vocab_too_big(folder, tmp_path):
  build(str(folder), tmp_path / "w", vocab_size=400)
  tok_dir = str(tmp_path / "w" / "tokenizer")
  n = len(data.load_tokenizer(tok_dir))
  used = build(str(folder), tmp_path / "w2", tokenizer=tok_dir, vocab_size=n)
  assert not (tmp_path / "w2" / "tokenizer").exists() and len(used.tokenizer) == n
  with pytest.raises(ValueError, match=rf"{n} tokens.*vocab_size {n - 1}"):
    build(str(folder), tmp_path / "w3", tokenizer=tok_dir, vocab_size=n - 1)


def test_cached_tokenizer_of_another_corpus_is_refused(folder, tmp_path):
  build(str(folder), tmp_path / "w")
  with pytest.raises(ValueError, match=r"tokenizer cached in .* was trained on other training documents"):
    build(str(folder), tmp_path / "w", max_documents=10)
  with pytest.raises(ValueError, match=r"was trained with vocab_size 320, not 600; this workdir's checkpoints"):
    build(str(folder), tmp_path / "w", vocab_size=600)


def test_vocab_below_byte_alphabet(folder, tmp_path):
  with pytest.raises(ValueError, match="vocab_size 100"):
    build(str(folder), tmp_path / "w", vocab_size=100)


def lowest_hash_sample(documents, budget):
  """The documents (in order) of lowest sha256 whose UTF-8 sizes add up to at most ``budget`` (at least one),
  written here independently of the package."""
  rank = lambda d: int.from_bytes(hashlib.sha256(d.encode("utf-8")).digest()[:8], "big")
  by_hash = sorted(documents, key=rank)
  sizes = [len(d.encode("utf-8")) for d in by_hash]
  kept = set(by_hash[:max(1, sum(total <= budget for total in itertools.accumulate(sizes)))])
  return [d for d in documents if d in kept]


@pytest.mark.parametrize("budget", [1, 700, 3000, None])
def test_a_split_samples_its_documents_of_lowest_hash_within_a_byte_budget(budget):
  documents = docs(120) + ["é" * 400]  # a character of two bytes counts two
  train, val, _ = data.split_corpus(data.Corpus(lambda: documents), 0.1)
  sample = train.sample(budget)
  expected = list(train) if budget is None else lowest_hash_sample(list(train), budget)
  assert list(sample) == expected and len(sample) == len(expected)
  assert sample.bytes == sum(len(d.encode("utf-8")) for d in expected)
  assert train.bytes + val.bytes == sum(len(d.encode("utf-8")) for d in documents)
  if budget is not None:
    assert len(expected) == 1 or sample.bytes <= budget
    assert 1 <= len(expected) < len(train)
  half = train.sample(train.bytes // 2)  # drawn from the whole corpus, not its first documents
  assert {documents.index(d) < 60 for d in half} == {True, False}
  assert train.sample(train.bytes) is train


def test_the_tokenizer_learns_from_its_sample_and_its_record_names_the_whole_split(folder, tmp_path):
  lines = []
  built = build(str(folder), tmp_path / "w", tokenizer_train_bytes=250, progress=lines.append)
  with data.open_corpus(data.data_spec(make_config(str(folder)))) as corpus:
    full = list(data.split_corpus(corpus, 0.2).train)
  sample = lowest_hash_sample(full, 250)
  assert 1 < len(sample) < len(full)
  assert built.tokenizer.get_vocab() == data.train_tokenizer(sample, VOCAB).get_vocab()
  assert built.tokenizer.get_vocab() != data.train_tokenizer(full, VOCAB).get_vocab()
  record = json.loads((tmp_path / "w" / "tokenizer" / data.CORPUS_RECORD).read_text())
  assert record == {"corpus_sha256": data.fingerprint(full), "vocab_size": VOCAB, "trained_on_documents": len(sample),
                    "trained_on_bytes": sum(len(d.encode("utf-8")) for d in sample)}
  assert (f"data: training a byte-level BPE of {VOCAB} tokens on a sample of the training split: {len(sample)} of "
          f"its {len(full)} documents") in "\n".join(lines)
  assert built.stats["train_bytes"] == sum(len(d.encode("utf-8")) for d in full)


def test_a_workdir_keeps_its_tokenizer_whatever_the_sample_and_reads_records_written_before_samples(
    folder, tmp_path, monkeypatch):
  first = build(str(folder), tmp_path / "w")
  record_path = tmp_path / "w" / "tokenizer" / data.CORPUS_RECORD
  record = json.loads(record_path.read_text())
  assert record["trained_on_documents"] == first.stats["train_documents"]  # all of them fit the default sample
  record_path.write_text(json.dumps({key: record[key] for key in ("corpus_sha256", "vocab_size")}))

  def no_training(*_):
    raise AssertionError("retrained")

  monkeypatch.setattr(data.tokenizer, "train_tokenizer", no_training)
  shutil.rmtree(tmp_path / "w" / "data_cache")  # so that the corpus is read again and the record compared
  second = build(str(folder), tmp_path / "w", tokenizer_train_bytes=100)
  np.testing.assert_array_equal(first.train.rows.tokens_N, second.train.rows.tokens_N)
  with pytest.raises(ValueError, match=r"was trained on other training documents"):
    build(str(folder), tmp_path / "w", max_documents=10)


def test_a_cap_of_zero_or_none_is_no_cap_and_the_tokenizer_sample_defaults_to_a_gigabyte():
  from configs.base import base

  spec = data.data_spec(base().data)
  assert (spec.max_documents, spec.max_bytes, spec.tokenizer_train_bytes) == (None, None, 10**9)
  spec = data.data_spec(make_config(max_documents=0, max_bytes=5, tokenizer_train_bytes=None))
  assert (spec.max_documents, spec.max_bytes, spec.tokenizer_train_bytes) == (None, 5, None)
  assert data.data_spec(make_config(tokenizer_train_bytes=0)).tokenizer_train_bytes is None
  assert data.data_spec({"seq_len": 8}).tokenizer_train_bytes == 10**9


# ----------------------------------------------------------------------------- rows


def toy_rows(lengths, seq_len, packing, pad_id=0):
  """Documents of the given token lengths (eos included) with distinct token values (doc*100 + i)."""
  pieces = [np.arange(n, dtype=np.int32) + 100 * (d + 1) for d, n in enumerate(lengths)]
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return data.Rows(np.concatenate(pieces), offsets, seq_len, packing, pad_id)


@pytest.mark.parametrize("packing", [True, False])
def test_rows_outside_the_split_are_refused(packing):
  rows = toy_rows([3, 5, 2, 8], seq_len=4, packing=packing)
  rows(np.arange(len(rows)))
  for bad in ([len(rows)], [-1], [0, len(rows) + 3]):
    with pytest.raises(IndexError, match=rf"asked of {len(rows)}$"):
      rows(np.array(bad))


def test_packing():
  rows = toy_rows([3, 5, 2, 8], seq_len=4, packing=True)  # 18 tokens → rows of 5, overlapping by one
  assert len(rows) == 5 and rows.n_targets == 17
  b = rows(np.arange(5))
  flat = rows.tokens_N
  for r in range(5):
    row = flat[4 * r:4 * r + 5]
    n = len(row)
    np.testing.assert_array_equal(b["inputs"][r, :n - 1], row[:-1])
    np.testing.assert_array_equal(b["targets"][r, :n - 1], row[1:])
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # shifted by one
  # targets: every token but the first, once
  np.testing.assert_array_equal(b["targets"][b["loss_mask"] > 0], flat[1:])
  # row 0: tokens 100 101 102 | 200 → segments 1 1 1 2, positions 0 1 2 0
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 2])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 0])
  # row 1: 201 ... 204 | 300 (target) → one segment
  np.testing.assert_array_equal(b["inputs"][1], [201, 202, 203, 204])
  np.testing.assert_array_equal(b["targets"][1, -1], 300)
  np.testing.assert_array_equal(b["segment_ids"][1], [1, 1, 1, 1])
  # row 2: tokens 300 301 | 400 401 → 1 1 2 2 / 0 1 0 1
  np.testing.assert_array_equal(b["inputs"][2], [300, 301, 400, 401])
  np.testing.assert_array_equal(b["segment_ids"][2], [1, 1, 2, 2])
  np.testing.assert_array_equal(b["positions"][2], [0, 1, 0, 1])
  # last row: tokens 406 407, then padding → mask 1 0 0 0, segments 1 1 0 0
  np.testing.assert_array_equal(b["inputs"][4], [406, 407, 0, 0])
  np.testing.assert_array_equal(b["targets"][4], [407, 0, 0, 0])
  np.testing.assert_array_equal(b["loss_mask"][4], [1, 0, 0, 0])
  np.testing.assert_array_equal(b["segment_ids"][4], [1, 1, 0, 0])
  for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                     ("segment_ids", np.int32), ("positions", np.int32)]:
    assert b[key].dtype == dtype and b[key].shape == (5, 4)


def test_packing_positions_match_the_model():
  import jax.numpy as jnp
  from galore_jax.models import llama

  b = toy_rows([3, 9, 1, 2, 6, 4], seq_len=8, packing=True)(np.arange(3))
  np.testing.assert_array_equal(b["positions"], np.asarray(llama.segment_positions(jnp.asarray(b["segment_ids"]))))


def test_no_packing_pads_and_truncates():
  rows = toy_rows([3, 8, 1, 5], seq_len=4, packing=False, pad_id=7)
  assert len(rows) == 3  # a document of only eos has no target
  b = rows(np.arange(3))
  np.testing.assert_array_equal(b["inputs"][0], [100, 101, 102, 7])
  np.testing.assert_array_equal(b["targets"][0], [101, 102, 7, 7])
  np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 0, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 0])
  np.testing.assert_array_equal(b["inputs"][1], [200, 201, 202, 203])  # truncated to seq_len + 1
  np.testing.assert_array_equal(b["targets"][1], [201, 202, 203, 204])
  np.testing.assert_array_equal(b["loss_mask"][1], [1, 1, 1, 1])
  np.testing.assert_array_equal(b["positions"][1], [0, 1, 2, 3])
  np.testing.assert_array_equal(b["inputs"][2], [400, 401, 402, 403])
  np.testing.assert_array_equal(b["targets"][2], [401, 402, 403, 404])


def test_build_without_packing(folder, tmp_path):
  built = build(str(folder), tmp_path / "w", packing=False, seq_len=48)
  rows = built.train.rows
  assert built.stats["train_rows"] == built.stats["train_documents"] == len(rows)
  doc_lengths = np.diff(data.tokenize_documents(built.tokenizer, [""], built.eos_id)[1])  # sanity: eos only
  assert doc_lengths.tolist() == [1]
  b = rows(np.arange(len(rows)))
  real = b["loss_mask"].sum(axis=1)
  assert (real < 48).any() and (real == 48).any()  # some documents padded, some truncated
  masked = b["loss_mask"] == 0
  assert (b["targets"][masked] == built.pad_id).all()
  short = real < 48  # a padded row ends its document: the last unmasked target is eos
  last = real[short].astype(int) - 1
  assert (b["targets"][short][np.arange(short.sum()), last] == built.eos_id).all()
  assert (next(built.train)["inputs"].shape == (4, 48))


# ----------------------------------------------------------------------------- batches


def equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_reproduces_batches_exactly():
  rows = toy_rows(list(range(2, 30)), seq_len=8, packing=True)  # 51 rows: batches straddle epochs
  it = data.Batches(rows, batch_size=7, seed=3)
  for _ in range(11):
    next(it)
  state = it.state()
  assert set(state) == {"epoch", "index", "rows"} and state["epoch"] >= 1
  expected = [next(it) for _ in range(10)]
  resumed = data.Batches(rows, batch_size=7, seed=3)
  resumed.restore(json.loads(json.dumps(state)))
  assert all(equal(e, next(resumed)) for e in expected)
  fresh = data.Batches(rows, batch_size=7, seed=3)
  assert all(equal(e, b) for e, b in zip([next(fresh) for _ in range(21)][11:], expected))


def test_epochs_cover_every_row_and_reshuffle():
  rows = toy_rows([5] * 40, seq_len=4, packing=False)  # 40 rows, one per document
  it = data.Batches(rows, batch_size=8, seed=0)
  epochs = [np.concatenate([next(it)["inputs"][:, 0] for _ in range(5)]) for _ in range(3)]
  for order in epochs:
    assert sorted(order.tolist()) == sorted(rows.tokens_N[rows.starts_and_lengths(np.arange(len(rows)))[0]].tolist())
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  other_seed = data.Batches(rows, batch_size=8, seed=1)
  assert not np.array_equal(next(other_seed)["inputs"], data.Batches(rows, batch_size=8, seed=0).__next__()["inputs"])
  assert it.state() == {"epoch": 3, "index": 0, "rows": 40}


def test_restore_refuses_other_data():
  it = data.Batches(toy_rows([5] * 10, seq_len=4, packing=False), batch_size=2)
  with pytest.raises(ValueError, match="10 rows.*12 rows"):
    it.restore({"epoch": 0, "index": 0, "rows": 12})


def test_eval_batches_fixed_and_filled_out():
  rows = toy_rows([5] * 7, seq_len=4, packing=False)
  batches = data.eval_batch_list(rows, batch_size=3, max_batches=None)
  assert len(batches) == 3 and all(b["inputs"].shape == (3, 4) for b in batches)
  np.testing.assert_array_equal(batches[0]["inputs"][:, 0], [100, 200, 300])  # in order
  assert batches[2]["loss_mask"][0].sum() == 4 and batches[2]["loss_mask"][1:].sum() == 0
  assert sum(b["loss_mask"].sum() for b in batches) == rows.n_targets
  assert len(data.eval_batch_list(rows, batch_size=3, max_batches=2)) == 2


def test_build_eval_batches(folder, tmp_path):
  built = build(str(folder), tmp_path / "w", eval_batch_size=3, eval_batches=2)
  assert 1 <= len(built.eval_batches) <= 2
  assert all(b["inputs"].shape == (3, 16) for b in built.eval_batches)
  again = build(str(folder), tmp_path / "w", eval_batch_size=3, eval_batches=2)
  assert all(equal(a, b) for a, b in zip(built.eval_batches, again.eval_batches))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_value(tmp_path, folder):
  empty = tmp_path / "empty"
  empty.mkdir()
  (tmp_path / "blank.txt").write_text("   \n\n")
  (tmp_path / "nottok").mkdir()
  cases = [
      (dict(path=str(tmp_path / "missing")), "missing"),
      (dict(path=str(empty)), str(empty)),
      (dict(path=str(tmp_path / "blank.txt")), "blank.txt"),
      (dict(path=str(folder), seq_len=0), "seq_len"),
      (dict(path=str(folder), seq_len=-3), "-3"),
      (dict(path=str(folder), validation_fraction=1.0), "validation_fraction"),
      (dict(path=str(folder), tokenizer=str(tmp_path / "no_tok")), "no_tok"),
      (dict(path=str(folder), tokenizer=str(tmp_path / "nottok")), "nottok"),
      (dict(path=str(folder), max_bytes=-1), "max_bytes"),
      (dict(path=str(folder), max_documents=2.5), "max_documents"),
      (dict(path=str(folder), tokenizer_train_bytes="1GB"), "tokenizer_train_bytes"),
  ]
  for overrides, needle in cases:
    path = overrides.pop("path")
    with pytest.raises(ValueError) as info:
      build(path, tmp_path / "w", **overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message, (overrides, message)
  assert not (tmp_path / "w").exists()  # bad input writes nothing


def test_a_broken_link_and_a_json_string_are_named(folder, tmp_path):
  os.symlink(tmp_path / "gone.txt", folder / "linked.txt")
  with pytest.raises(ValueError, match=r"file '[^']*linked\.txt' cannot be read \(No such file or directory\)$"):
    build(str(folder), tmp_path / "w")
  (tmp_path / "string.json").write_text('"one string, not rows"\n')
  with pytest.raises(ValueError, match=r"string\.json' line 1 is a JSON str, not an object$"):
    build(str(tmp_path / "string.json"), tmp_path / "w")


def test_corpus_too_small_to_split(tmp_path):
  path = tmp_path / "one.txt"
  path.write_text("x")
  with pytest.raises(ValueError, match="one.txt"):
    build(str(path), tmp_path / "w", validation_fraction=0.5)


def test_file_that_is_not_utf8_text_is_named(folder, tmp_path):
  (folder / "050.txt").write_bytes(b"fine first line\nthen \xff\xfe binary\n")
  with pytest.raises(ValueError, match=r"file '[^']*050\.txt' is not UTF-8 text \(line 2 has byte 0xff at column 6\)"):
    build(str(folder), tmp_path / "w")


def test_malformed_json_line_is_named_without_library_log_lines(tmp_path, capfd):
  rows = [json.dumps({"text": d}) for d in docs(10)]
  for name, bad, needle in [("broken.jsonl", '{"text": unquoted}', r"line 4 is not valid JSON \(Expecting value"),
                            ("list.jsonl", '["text"]', "line 4 is a JSON list, not an object")]:
    (tmp_path / name).write_text("\n".join(rows[:3] + [bad] + rows[3:]) + "\n")
    with pytest.raises(ValueError, match=rf"file '[^']*{name}' {needle}") as info:
      build(str(tmp_path / name), tmp_path / "w")
    assert "\n" not in str(info.value)
  assert capfd.readouterr().err == ""  # datasets logs an ERROR line per bad file unless silenced


def test_json_file_holding_one_document_is_not_blamed_line_by_line(tmp_path):
  """A .json file may be one JSON list (datasets reads it); a bad one elsewhere is the one named."""
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.json").write_text(json.dumps([{"text": d} for d in docs(10)], indent=1))
  (tmp_path / "c" / "b.jsonl").write_text('{"text": "x"}\n{"text": \n')
  with pytest.raises(ValueError, match=r"b\.jsonl' line 2 is not valid JSON"):
    build(str(tmp_path / "c"), tmp_path / "w")


def test_file_that_is_not_parquet_is_named(folder, tmp_path):
  (folder / "z.parquet").write_bytes(b"PAR1 but not really")
  with pytest.raises(ValueError, match=r"file '[^']*z\.parquet' is not a readable parquet file"):
    build(str(folder), tmp_path / "w")


@pytest.mark.parametrize("damage", ["truncate_tokens", "truncate_offsets", "shorter_tokens", "bad_meta"])
def test_corrupt_token_cache_is_named_with_the_directory_to_delete(folder, tmp_path, damage):
  import shutil

  build(str(folder), tmp_path / "w")
  (cache,) = (tmp_path / "w" / "data_cache").iterdir()
  target = {"truncate_tokens": "train_tokens.npy", "truncate_offsets": "val_offsets.npy",
            "shorter_tokens": "train_tokens.npy", "bad_meta": "meta.json"}[damage]
  path = cache / target
  if damage == "shorter_tokens":  # a whole, readable .npy file with fewer tokens than meta.json records
    np.save(path, np.load(path)[:-5])
  else:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2 + 20])
  with pytest.raises(ValueError, match=rf"token cache file '{path}' is truncated or corrupt") as info:
    build(str(folder), tmp_path / "w")
  message = str(info.value)
  assert f"delete the directory '{cache}'" in message and "\n" not in message
  shutil.rmtree(cache)  # the advice works
  assert build(str(folder), tmp_path / "w").stats["train_tokens"] > 0


def test_caches_built_by_two_processes_at_once_keep_the_first_published(folder, tmp_path, monkeypatch):
  """The processes of a multi-host run build one workdir's tokenizer and token cache at once: the one that
  publishes second drops its copy and reads the first's (os.replace cannot replace a non-empty directory)."""
  import shutil

  build(str(folder), tmp_path / "other")
  write_dir_atomic = workdir_lib.write_dir_atomic

  def another_process_publishes_first(final, write, *marker):
    shutil.copytree(str(final).replace(str(tmp_path / "w"), str(tmp_path / "other")), final)
    open(os.path.join(final, "published_by_the_other_process"), "w").close()
    write_dir_atomic(final, write, *marker)

  monkeypatch.setattr(workdir_lib, "write_dir_atomic", another_process_publishes_first)
  built = build(str(folder), tmp_path / "w")
  (cache,) = (tmp_path / "w" / "data_cache").iterdir()
  for kept in (tmp_path / "w" / "tokenizer", cache):
    assert (kept / "published_by_the_other_process").exists()
  assert not [p for p in (tmp_path / "w").rglob(".tmp-*")]
  np.testing.assert_array_equal(built.train.rows.tokens_N, np.load(cache / "train_tokens.npy"))

"""The data pipeline of ``train.py``: corpus → documents → split → tokenizer → token cache → batches.

Everything here runs on the host in numpy; a batch is a dict of numpy arrays::

  inputs[B,S] int32, targets[B,S] int32, loss_mask[B,S] float32, segment_ids[B,S] int32, positions[B,S] int32

Decisions (see also ``build_data``):

* **Documents.** A ``.txt`` file is one document (code and prose keep their context); a ``.jsonl``/
  ``.json``/``.parquet`` row or a ``save_to_disk`` row is one document (its ``text_field``). Rows whose
  field is missing or not a string, and empty or whitespace-only documents, are dropped and counted
  (``stats["skipped_documents"]``, which ``train.py`` prints at start-up). A folder is read recursively
  (hidden entries skipped), grouped by kind (text, json, parquet) and sorted by relative path within a kind.
* **Embedded corpus** (``path=None``): the Python standard library's own ``*.py`` sources, sorted by
  relative path, without test directories, site-packages, ``encodings`` tables and the machine-specific
  build files (``_sysconfigdata*``, ``config-*``), one document per file. Identical on every machine
  with the same Python version.
* **Caps.** ``max_documents`` then ``max_bytes`` (UTF-8) keep a prefix of the documents; the document
  that crosses ``max_bytes`` is cut to fit.
* **Split.** By document content: a document is in validation iff ``sha256(text) / 2**64 <
  validation_fraction``. No random state; duplicates land on the same side. If that leaves validation
  empty, the document with the smallest hash moves there (the largest moves to train if train is
  empty); a corpus of one document is cut at the line nearest ``1 - validation_fraction`` of its length.
* **Tokenizer.** ``tokenizer=None`` trains a byte-level BPE (``<pad>``=0, ``<bos>``=1, ``<eos>``=2) on the
  training split with the model's ``vocab_size`` and caches it in ``workdir/tokenizer`` (a
  ``save_pretrained`` directory, reloadable with ``AutoTokenizer``); later runs re-use it and refuse a
  cache trained on a different corpus. Each document is encoded without special tokens and gets
  ``eos`` appended; nothing is prepended.
* **Token cache.** ``workdir/data_cache/<key>/{train,val}_{tokens,offsets}.npy`` where ``key`` hashes the
  split documents' contents and the tokenizer; reloaded memory-mapped and checked against the token counts
  in its ``meta.json`` (a truncated or corrupt file is refused, naming it and the directory to delete).
  Files are parsed by ``datasets`` into a temporary cache that is removed afterwards. Caches are written to a
  temporary directory and renamed; a file ``datasets`` cannot parse is named with its reason (not UTF-8 text,
  the first line that is not a JSON object, not parquet). The tokens are written to their file chunk by chunk,
  never joined in memory.
* **Later starts.** A token cache records the state of the corpus it was built from (``corpus_state.json``:
  every file under ``path`` with its size and modification time, the settings that pick and split the
  documents, the tokenizer, the vocabulary). A later start whose corpus state equals a recorded one loads that
  cache without reading the corpus; any change (a file touched, added or removed, another cap) reads it again
  and checks it as a first start does. As with ``make``, a file rewritten with the same size and an unchanged
  modification time goes unnoticed. The embedded corpus is always read again (it is small).
* **Rows.** ``packing=True``: the split's token stream is cut into rows of ``seq_len + 1`` tokens that
  overlap by one (row ``r`` = ``tokens[r*S : r*S + S + 1]``) so every token but the first is a target
  exactly once; the last, shorter row is padded. Segment ids number the documents inside a row from 1
  (0 = padding); positions restart at 0 at each segment, as ``llama.segment_positions`` does. The target
  after a document's ``eos`` is the next document's first token and is trained on (attention never
  crosses the boundary). ``packing=False``: one row per document, truncated to ``seq_len + 1`` tokens
  and padded with ``pad``; segment id 1 on real tokens. ``loss_mask`` is 1 exactly where the target
  is a real token.
* **Order.** Training rows are shuffled per epoch with ``np.random.default_rng((seed, epoch))``; epochs
  wrap forever and a batch may straddle two epochs. ``Batches.state()`` is ``{epoch, index, rows}``.
  Validation: the first ``eval_batches`` batches of the validation rows in order; a last partial batch
  is filled with fully masked rows so every eval batch has the same shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sysconfig
import tempfile
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from galore_jax.train.workdir import write_dir_atomic, write_text_atomic

DEFAULT_MAX_BYTES = 8_000_000  # the embedded corpus's cap when data.max_bytes is None
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in a trained tokenizer
FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KIND_ORDER = ("text", "json", "parquet")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                              "encodings"})
CORPUS_RECORD = "galore_jax_corpus.json"  # next to a trained tokenizer: what it was trained on
CORPUS_STATE = "corpus_state.json"  # in a token cache: the corpus files it was built from (corpus_state)
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The validated ``data`` section of a config."""

  path: str | None
  tokenizer: str | None
  seq_len: int
  packing: bool
  validation_fraction: float
  max_documents: int | None
  max_bytes: int | None
  text_field: str


def _get(config: Any, key: str, default: Any) -> Any:
  """``config.key`` for a ConfigDict, a dict or any object; ``default`` when absent or None."""
  if isinstance(config, dict):
    value = config.get(key, default)
  else:
    try:
      value = config[key] if key in config else default  # ConfigDict (also FrozenConfigDict)
    except TypeError:
      value = getattr(config, key, default)
  return default if value is None else value


def data_spec(data_config: Any) -> DataSpec:
  """Read and check ``data_config``; a bad value raises ``ValueError`` naming it."""
  seq_len = _get(data_config, "seq_len", 0)
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len <= 0:
    raise ValueError(f"data.seq_len must be a positive integer, got {seq_len!r}")
  fraction = _get(data_config, "validation_fraction", 0.05)
  if not 0.0 <= float(fraction) < 1.0:
    raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction!r}")
  caps = {}
  for name in ("max_documents", "max_bytes"):
    value = _get(data_config, name, None)
    if value is not None and (isinstance(value, bool) or int(value) <= 0):
      raise ValueError(f"data.{name} must be a positive integer or None, got {value!r}")
    caps[name] = None if value is None else int(value)
  text_field = _get(data_config, "text_field", "text")
  if not isinstance(text_field, str) or not text_field:
    raise ValueError(f"data.text_field must be a non-empty string, got {text_field!r}")
  path, tokenizer = _get(data_config, "path", None), _get(data_config, "tokenizer", None)
  return DataSpec(path=None if path in (None, "") else str(path),
                  tokenizer=None if tokenizer in (None, "") else str(tokenizer), seq_len=int(seq_len),
                  packing=bool(_get(data_config, "packing", True)), validation_fraction=float(fraction),
                  text_field=text_field, **caps)


# ----------------------------------------------------------------------------- corpus


def stdlib_documents(max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
  """The Python standard library's ``*.py`` sources, one document per file, sorted by relative path.

  Test directories, site-packages, the ``encodings`` tables and machine-specific build files are
  skipped; reading stops once ``max_bytes`` (UTF-8) are gathered (the caller cuts the last one).
  """
  root = sysconfig.get_paths()["stdlib"]
  relpaths = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith((".", "config-"))]
    for name in filenames:
      if name.endswith(".py") and not name.startswith(("_sysconfigdata", "test_", ".")):
        relpaths.append(os.path.normpath(os.path.join(rel_dir, name)))
  documents, total = [], 0
  for rel in sorted(relpaths, key=lambda p: p.replace(os.sep, "/")):
    try:
      with open(os.path.join(root, rel), encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError):
      continue
    if text.strip():
      documents.append(text)
      total += len(text.encode("utf-8"))
      if max_bytes is not None and total >= max_bytes:
        break
  return documents


def _corpus_files(path: str) -> dict[str, list[str]]:
  """Readable corpus files under ``path`` grouped by kind, each list sorted by relative path."""
  found: dict[str, list[str]] = {kind: [] for kind in KIND_ORDER}
  if os.path.isfile(path):
    kind = FILE_KINDS.get(os.path.splitext(path)[1].lower(), "text")  # an explicit file of any name: text
    found[kind].append(path)
    return found
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      kind = FILE_KINDS.get(os.path.splitext(name)[1].lower())
      if kind and not name.startswith("."):
        found[kind].append(os.path.join(dirpath, name))
  for files in found.values():
    files.sort(key=lambda f: os.path.relpath(f, path).replace(os.sep, "/"))
  return found


@contextlib.contextmanager
def _quiet_offline_datasets():
  """HF ``datasets`` with the hub off (local files only), without progress bars and without its log lines
  (a file it cannot parse is logged as an ERROR before it raises; the caller reports it in one line)."""
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  os.environ["HF_HUB_OFFLINE"] = "1"
  import datasets
  from datasets.utils import logging as datasets_logging

  for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # read at import time: set them if already imported
    if hasattr(datasets.config, name):
      setattr(datasets.config, name, True)
  was_disabled = datasets.are_progress_bars_disabled()
  verbosity = datasets_logging.get_verbosity()
  datasets.disable_progress_bars()
  datasets_logging.set_verbosity(datasets_logging.CRITICAL + 1)
  try:
    yield datasets
  finally:
    datasets_logging.set_verbosity(verbosity)
    if not was_disabled:
      datasets.enable_progress_bars()


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def _column(dataset: Any, text_field: str, where: str) -> list[Any]:
  if text_field not in dataset.column_names:
    raise ValueError(f"data.text_field {text_field!r} is not a column of {where} (columns: {dataset.column_names})")
  return list(dataset[text_field])


def _is_saved_dataset(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json", "dataset_info.json"))


class Corpus(NamedTuple):
  """A corpus's documents, and how many of its rows or files had no text (their ``text_field`` missing, not a
  string, or only whitespace), which are left out."""

  documents: list[str]
  skipped: int = 0


def load_documents(path: str, text_field: str = "text", cache_dir: str | None = None) -> Corpus:
  """The :class:`Corpus` of a text file, a folder of .txt/.jsonl/.json/.parquet files, or a ``save_to_disk`` dir.

  Uses HF ``datasets`` offline; its arrow files go to ``cache_dir`` (default: a temporary directory,
  removed afterwards: the documents are returned as strings and the tokens are cached by
  ``cached_tokens``). Raises ``ValueError`` naming ``path`` when it is missing, holds no readable
  files, or cannot be parsed.
  """
  if not os.path.exists(path):
    raise ValueError(f"data.path {path!r} does not exist")
  with contextlib.ExitStack() as stack:
    if cache_dir is None:
      cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="galore_jax_datasets-"))
    return _load_documents(path, text_field, cache_dir)


def _load_documents(path: str, text_field: str, cache_dir: str) -> Corpus:
  with _quiet_offline_datasets() as datasets:
    if _is_saved_dataset(path):
      try:
        saved = datasets.load_from_disk(path)
      except Exception as e:  # noqa: BLE001 - any failure is bad input here
        raise ValueError(f"data.path {path!r} is not a readable saved dataset ({_one_line(e)})") from None
      if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved and len(saved) != 1:
          raise ValueError(f"data.path {path!r} is a DatasetDict without a 'train' split (splits: {list(saved)})")
        saved = saved["train"] if "train" in saved else next(iter(saved.values()))
      rows = _column(saved, text_field, repr(path))
    else:
      files = _corpus_files(path)
      if not any(files.values()):
        raise ValueError(f"data.path {path!r} holds no .txt, .jsonl, .json or .parquet files")
      rows = []
      for kind in KIND_ORDER:
        if not files[kind]:
          continue
        options = {"sample_by": "document"} if kind == "text" else {}
        try:
          loaded = datasets.load_dataset(kind, data_files=files[kind], split="train", cache_dir=cache_dir, **options)
        except Exception as e:  # noqa: BLE001 - any failure is bad input here
          culprit = _unreadable_file(kind, files[kind])
          if culprit:
            raise ValueError(f"data.path {path!r}: {culprit}") from None
          raise ValueError(f"data.path {path!r}: cannot read its {kind} files ({_one_line(e)})") from None
        rows += _column(loaded, text_field if kind != "text" else "text", f"the {kind} files of {path!r}")
  documents = [text for text in rows if isinstance(text, str) and text.strip()]
  return Corpus(documents, skipped=len(rows) - len(documents))


def _unreadable_file(kind: str, files: Sequence[str]) -> str | None:
  """Why the first unreadable file of ``files`` cannot be read, in words naming it; None if none is found.

  ``datasets`` reports a bad file as a generic DatasetGenerationError without its name: this re-reads the
  files (only after a failure) to say which one is not UTF-8 text, which JSON line does not parse, or
  which file is not parquet.
  """
  for path in files:
    problem = _parquet_problem(path) if kind == "parquet" else _text_problem(path, json_lines=kind == "json")
    if problem:
      return f"file {path!r} {problem}"
  return None


def _text_problem(path: str, json_lines: bool) -> str | None:
  """``is not UTF-8 text (...)``, ``line N is not a JSON object (...)`` or ``cannot be read (...)`` (a broken
  link); None when the file reads."""
  bad_line = None
  try:
    f = open(path, "rb")
  except OSError as e:
    return f"cannot be read ({e.strerror})"
  with f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        return f"is not UTF-8 text (line {number} has byte 0x{raw[e.start]:02x} at column {e.start + 1})"
      if json_lines and bad_line is None and line.strip():
        try:
          row = json.loads(line)
          if not isinstance(row, dict):
            bad_line = f"line {number} is a JSON {type(row).__name__}, not an object"
        except json.JSONDecodeError as e:
          bad_line = f"line {number} is not valid JSON ({e.msg} at column {e.colno})"
  if bad_line and not _is_one_json_document(path):  # datasets also reads a .json file holding one list/object
    return bad_line
  return None


def _is_one_json_document(path: str) -> bool:
  """Whether the file is one JSON object or list, which ``datasets`` reads as rows (a lone string it cannot)."""
  try:
    with open(path, encoding="utf-8") as f:
      return isinstance(json.load(f), (dict, list))
  except ValueError:
    return False


def _parquet_problem(path: str) -> str | None:
  import pyarrow.parquet

  try:
    pyarrow.parquet.ParquetFile(path)
    return None
  except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
    return f"is not a readable parquet file ({_one_line(e)})"


def cap_documents(documents: Sequence[str], max_documents: int | None, max_bytes: int | None) -> list[str]:
  """The first ``max_documents`` documents, then a prefix of at most ``max_bytes`` UTF-8 bytes."""
  documents = list(documents[:max_documents] if max_documents else documents)
  if max_bytes is None:
    return documents
  capped, total = [], 0
  for doc in documents:
    size = len(doc.encode("utf-8"))
    if total + size > max_bytes:
      head = doc.encode("utf-8")[:max_bytes - total].decode("utf-8", errors="ignore")
      if head.strip():
        capped.append(head)
      break
    capped.append(doc)
    total += size
  return capped


def corpus_documents(spec: DataSpec, cache_dir: str | None = None) -> Corpus:
  """The capped documents ``spec`` names (the embedded stdlib corpus when ``spec.path`` is None)."""
  if spec.path is None:
    max_bytes = spec.max_bytes or DEFAULT_MAX_BYTES
    return Corpus(cap_documents(stdlib_documents(max_bytes), spec.max_documents, max_bytes))
  corpus = load_documents(spec.path, spec.text_field, cache_dir)
  return corpus._replace(documents=cap_documents(corpus.documents, spec.max_documents, spec.max_bytes))


# ----------------------------------------------------------------------------- split


def document_hash(document: str) -> float:
  """A document's place in [0, 1): the first 8 bytes of ``sha256(text)`` over 2**64."""
  return int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(documents: Sequence[str], validation_fraction: float) -> tuple[list[str], list[str]]:
  """``(train, validation)`` by content hash, order kept; see the module docstring for the fallbacks."""
  if validation_fraction <= 0 or not documents:
    return list(documents), []
  if len(documents) == 1:
    doc = documents[0]
    cut = int(len(doc) * (1.0 - validation_fraction))
    newline = doc.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return [t for t in [doc[:cut]] if t.strip()], [t for t in [doc[cut:]] if t.strip()]
  hashes = [document_hash(d) for d in documents]
  in_val = [h < validation_fraction for h in hashes]
  if not any(in_val):
    in_val[int(np.argmin(hashes))] = True
  if all(in_val):
    in_val[int(np.argmax(hashes))] = False
  train = [d for d, v in zip(documents, in_val) if not v]
  val = [d for d, v in zip(documents, in_val) if v]
  return train, val


def fingerprint(documents: Iterable[str]) -> str:
  """sha256 over the documents and their boundaries."""
  h = hashlib.sha256()
  for doc in documents:
    data = doc.encode("utf-8")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)
  return h.hexdigest()


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: Sequence[str], vocab_size: int):
  """A byte-level BPE with ``<pad>``, ``<bos>``, ``<eos>`` (ids 0, 1, 2) as a ``PreTrainedTokenizerFast``."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  backend.train_from_iterator(documents, trainer=trainer, length=len(documents))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def load_tokenizer(path: str, what: str = "data.tokenizer"):
  """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; ``ValueError`` naming ``what`` and ``path``
  if unreadable."""
  if not os.path.isdir(path):
    raise ValueError(f"{what} {path!r} is not a directory")
  import transformers

  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - any failure is bad input here
    raise ValueError(f"{what} {path!r} could not be loaded ({_one_line(e)})") from None


def cached_tokenizer(workdir: str, train_documents: Sequence[str], vocab_size: int):
  """The tokenizer in ``workdir/tokenizer``, trained on ``train_documents`` first if absent."""
  directory = os.path.join(workdir, "tokenizer")
  record = {"corpus_sha256": fingerprint(train_documents), "vocab_size": int(vocab_size)}
  record_path = os.path.join(directory, CORPUS_RECORD)
  if os.path.isdir(directory) and os.path.isfile(record_path):
    with open(record_path) as f:
      saved = json.load(f)
    if saved != record:
      changed = (f"with vocab_size {saved.get('vocab_size')}, not {vocab_size}" if saved.get("vocab_size") != vocab_size
                 else "on other training documents (data.path's text or caps changed); to resume, restore them")
      raise ValueError(f"the tokenizer cached in {directory!r} was trained {changed}; this workdir's checkpoints "
                       "hold that tokenizer's ids, so a new run needs a fresh workdir")
  else:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
      raise ValueError(f"vocab_size {vocab_size} is below the byte-level tokenizer's minimum "
                       f"{256 + len(SPECIAL_TOKENS)}")
    tokenizer = train_tokenizer(train_documents, vocab_size)

    def write(tmp):
      tokenizer.save_pretrained(tmp)
      with open(os.path.join(tmp, CORPUS_RECORD), "w") as f:
        json.dump(record, f)

    write_dir_atomic(directory, write, CORPUS_RECORD)
  return load_tokenizer(directory, "the run's trained tokenizer")


def special_ids(tokenizer) -> tuple[int, int, int | None]:
  """``(pad_id, eos_id, bos_id)``; pad falls back to eos, bos may be None; no eos raises ``ValueError``."""
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  return int(pad_id), int(eos_id), None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)


def tokenizer_fingerprint(tokenizer) -> str:
  backend = getattr(tokenizer, "backend_tokenizer", None)
  text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256((type(tokenizer).__name__ + text + repr(special_ids(tokenizer))).encode()).hexdigest()


# ----------------------------------------------------------------------------- tokens


def encoded_chunks(tokenizer, documents: Sequence[str], eos_id: int,
                   chunk: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``(tokens int32, lengths_D int64)`` per ``chunk`` documents, each encoded without special tokens, + eos."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  for start in range(0, len(documents), chunk):
    batch = list(documents[start:start + chunk])
    if backend is not None:
      ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
    else:
      ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
    lengths_D = np.array([len(doc_ids) + 1 for doc_ids in ids], np.int64)
    tokens = np.full(int(lengths_D.sum()), eos_id, np.int32)
    for doc_ids, end in zip(ids, np.cumsum(lengths_D)):
      tokens[end - len(doc_ids) - 1:end - 1] = doc_ids
    yield tokens, lengths_D


def _offsets(lengths: Sequence[np.ndarray]) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(np.concatenate([np.zeros(0, np.int64), *lengths]))]).astype(np.int64)


def tokenize_documents(tokenizer, documents: Sequence[str], eos_id: int,
                       chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens_N int32, offsets_D1 int64)``: documents encoded without special tokens, each + eos.

  Document ``d`` is ``tokens_N[offsets_D1[d]:offsets_D1[d + 1]]``.
  """
  chunks = list(encoded_chunks(tokenizer, documents, eos_id, chunk))
  tokens_N = np.concatenate([np.zeros(0, np.int32)] + [tokens for tokens, _ in chunks])
  return tokens_N, _offsets([lengths for _, lengths in chunks])


def _save_split(directory: str, name: str, chunks: list[tuple[np.ndarray, np.ndarray]]) -> int:
  """``name_tokens.npy`` and ``name_offsets.npy`` in ``directory`` from encoded chunks, the tokens written chunk
  after chunk behind the header ``np.save`` would write (never joined in memory: a corpus's tokens are held
  once, not twice); the number of tokens."""
  size = sum(tokens.size for tokens, _ in chunks)
  header = {**np.lib.format.header_data_from_array_1_0(np.zeros(0, np.int32)), "shape": (size,)}
  with open(os.path.join(directory, f"{name}_tokens.npy"), "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
    for tokens, _ in chunks:
      f.write(tokens.astype("<i4", copy=False).tobytes())
  np.save(os.path.join(directory, f"{name}_offsets.npy"), _offsets([lengths for _, lengths in chunks]))
  return size


def _token_cache_key(tokenizer, splits: dict[str, Sequence[str]]) -> dict[str, Any]:
  return {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
          "splits": {name: fingerprint(docs) for name, docs in sorted(splits.items())}}


def token_cache_dir(cache_root: str, tokenizer, splits: dict[str, Sequence[str]]) -> str:
  """Where ``cached_tokens`` keeps ``splits`` tokenized by ``tokenizer``: ``cache_root/<key>/``, the key hashing
  the splits' contents and the tokenizer; it holds the tokens once its ``meta.json`` exists."""
  key = json.dumps(_token_cache_key(tokenizer, splits))
  return os.path.join(cache_root, hashlib.sha256(key.encode()).hexdigest()[:20])


def cached_tokens(directory: str, tokenizer, eos_id: int, splits: dict[str, Sequence[str]]
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``tokenize_documents`` of each split, cached in ``directory`` (:func:`token_cache_dir`)."""
  if not os.path.isfile(os.path.join(directory, "meta.json")):

    def write(tmp):
      counts = {name: _save_split(tmp, name, list(encoded_chunks(tokenizer, docs, eos_id)))
                for name, docs in splits.items()}
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"key": _token_cache_key(tokenizer, splits), "tokens": counts}, f)

    write_dir_atomic(directory, write, "meta.json")
  return load_token_cache(directory, splits)


def corpus_files(path: str | None) -> list[list[Any]] | None:
  """``[relative path, size, modification time]`` of every file under ``path`` (or of the file ``path``), taken
  before the corpus is read; None for the embedded corpus (``path`` None: small, read again) or a file that
  cannot be listed."""
  if path is None:
    return None
  root = os.path.abspath(path)
  paths = [root] if os.path.isfile(root) else sorted(os.path.join(d, name) for d, _, names in os.walk(root)
                                                     for name in names)
  try:
    return [[os.path.relpath(p, root), st.st_size, st.st_mtime_ns] for p in paths for st in [os.stat(p)]]
  except OSError:
    return None


def corpus_state(spec: DataSpec, files: list[list[Any]] | None, tokenizer, vocab_size: int) -> dict[str, Any] | None:
  """What a token cache is built from, cheap to compare at a later start: the corpus's ``files``
  (:func:`corpus_files`), the settings that pick and split its documents, the tokenizer and the model's
  vocabulary. None when ``files`` is None."""
  if files is None:
    return None
  return {"version": CACHE_VERSION, "path": os.path.abspath(spec.path), "files": files,
          "text_field": spec.text_field, "max_documents": spec.max_documents, "max_bytes": spec.max_bytes,
          "validation_fraction": spec.validation_fraction, "tokenizer": tokenizer_fingerprint(tokenizer),
          "vocab_size": int(vocab_size)}


def recorded_cache(cache_root: str, state: dict[str, Any] | None) -> tuple[str, dict[str, int]] | None:
  """``(directory, stats)`` of the token cache that :func:`record_corpus_state` recorded for ``state``, if any."""
  if state is None or not os.path.isdir(cache_root):
    return None
  for name in sorted(os.listdir(cache_root)):
    directory = os.path.join(cache_root, name)
    try:
      recorded = _read_json(os.path.join(directory, CORPUS_STATE))
    except (OSError, ValueError):
      continue
    if (isinstance(recorded, dict) and recorded.get("state") == state and isinstance(recorded.get("stats"), dict)
        and os.path.isfile(os.path.join(directory, "meta.json"))):
      return directory, recorded["stats"]
  return None


def record_corpus_state(directory: str, state: dict[str, Any] | None, stats: dict[str, int]) -> None:
  """Note in the token cache ``directory`` the corpus state it was built from, for :func:`recorded_cache`."""
  if state is not None:
    write_text_atomic(os.path.join(directory, CORPUS_STATE), json.dumps({"state": state, "stats": stats}))


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


class CorruptCache(ValueError):
  """A token-cache file that cannot be read or does not match its ``meta.json``."""


def load_token_cache(directory: str, names: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The cached ``(tokens_N, offsets_D1)`` of each split, checked against ``meta.json``'s token counts.

  A truncated, missing or inconsistent file raises :class:`CorruptCache` naming it and saying to delete
  ``directory`` (a cache: the next run rebuilds it).
  """
  def corrupt(path, reason):
    return CorruptCache(f"token cache file {path!r} is truncated or corrupt ({reason}); delete the directory "
                        f"{directory!r} (a cache: the next run rebuilds it)")

  def read(path, reader):
    try:
      return reader(path)
    except (ValueError, OSError, EOFError) as e:  # np.load / json raise these for short or garbled files
      raise corrupt(path, _one_line(e)) from None

  meta_path = os.path.join(directory, "meta.json")
  counts = read(meta_path, _read_json)
  arrays = {}
  for name in names:
    tokens_path, offsets_path = (os.path.join(directory, f"{name}_{kind}.npy") for kind in ("tokens", "offsets"))
    tokens_N = read(tokens_path, lambda p: np.load(p, mmap_mode="r"))
    offsets_D1 = read(offsets_path, np.load)
    expected = counts.get("tokens", {}).get(name) if isinstance(counts, dict) else None
    if tokens_N.ndim != 1 or tokens_N.size != expected:
      raise corrupt(tokens_path, f"{tokens_N.size} tokens, {meta_path!r} records {expected}")
    if offsets_D1.ndim != 1 or offsets_D1.size == 0 or offsets_D1[0] != 0 or offsets_D1[-1] != tokens_N.size:
      raise corrupt(offsets_path, f"its document offsets do not span the {tokens_N.size} tokens")
    arrays[name] = (tokens_N, offsets_D1)
  return arrays


# ----------------------------------------------------------------------------- rows and batches


def segment_positions(segment_ids_BS: np.ndarray) -> np.ndarray:
  """Positions that restart at 0 wherever the segment id changes (as ``llama.segment_positions``)."""
  B, S = segment_ids_BS.shape
  idx_BS = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
  starts_BS = np.concatenate([np.ones((B, 1), bool), segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]], axis=1)
  return (idx_BS - np.maximum.accumulate(np.where(starts_BS, idx_BS, 0), axis=1)).astype(np.int32)


class Rows:
  """The rows of one split: ``rows(indices_B) -> batch`` with rows of ``seq_len + 1`` tokens.

  ``packing``: row ``r`` is ``tokens[r*S : r*S + S + 1]`` (rows overlap by one token); otherwise row
  ``d`` is document ``d`` truncated to ``S + 1`` tokens. Short rows are padded with ``pad_id``.
  """

  def __init__(self, tokens_N: np.ndarray, offsets_D1: np.ndarray, seq_len: int, packing: bool, pad_id: int):
    self.tokens_N, self.seq_len, self.packing, self.pad_id = tokens_N, seq_len, packing, pad_id
    n_tokens = int(tokens_N.size)
    if packing:
      n_rows = -(-(n_tokens - 1) // seq_len) if n_tokens > 1 else 0  # every token but the first is a target
      self.starts_R = np.arange(n_rows, dtype=np.int64) * seq_len
      self.lengths_R = np.minimum(n_tokens - self.starts_R, seq_len + 1)
      self.offsets_D1 = np.asarray(offsets_D1, np.int64)
    else:
      keep = np.diff(offsets_D1) > 1  # a document of only eos has no target
      self.starts_R = offsets_D1[:-1][keep].astype(np.int64)
      self.lengths_R = np.minimum(np.diff(offsets_D1)[keep], seq_len + 1)

  def __len__(self) -> int:
    return int(self.starts_R.size)

  @property
  def n_targets(self) -> int:
    """Unmasked targets over all rows."""
    return int(np.sum(self.lengths_R - 1))

  def __call__(self, indices_B: np.ndarray, n_real: int | None = None) -> dict[str, np.ndarray]:
    """The batch of rows ``indices_B``; rows from ``n_real`` on are fully masked filler."""
    L = self.seq_len + 1
    indices_B = np.asarray(indices_B, np.int64)
    offset_L = np.arange(L, dtype=np.int64)
    lengths_B = self.lengths_R[indices_B].copy()
    if n_real is not None:
      lengths_B[n_real:] = 0
    valid_BL = offset_L[None, :] < lengths_B[:, None]
    idx_BL = np.minimum(self.starts_R[indices_B][:, None] + offset_L[None, :], max(self.tokens_N.size - 1, 0))
    tokens_BL = np.where(valid_BL, self.tokens_N[idx_BL], self.pad_id).astype(np.int32)
    if self.packing:
      doc_BL = np.searchsorted(self.offsets_D1, idx_BL, side="right") - 1  # the document of each token
      segments_BL = np.where(valid_BL, doc_BL - doc_BL[:, :1] + 1, 0).astype(np.int32)
    else:
      segments_BL = valid_BL.astype(np.int32)
    segment_ids_BS = segments_BL[:, :-1]
    return {
        "inputs": tokens_BL[:, :-1],
        "targets": tokens_BL[:, 1:],
        "loss_mask": valid_BL[:, 1:].astype(np.float32),
        "segment_ids": segment_ids_BS,
        "positions": segment_positions(segment_ids_BS),
    }


class Batches:
  """Training batches forever: rows shuffled per epoch by ``default_rng((seed, epoch))``; resumable.

  ``state()`` is ``{"epoch", "index", "rows"}`` (plain ints, JSON-safe); ``restore(state)`` continues
  exactly where ``state()`` was taken. A batch may straddle an epoch boundary.
  """

  def __init__(self, rows: Rows, batch_size: int, seed: int = 0):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    if len(rows) == 0:
      raise ValueError("the training split has no rows")
    self.rows, self.batch_size, self.seed = rows, int(batch_size), int(seed)
    self.epoch, self.index = 0, 0
    self._permutation_epoch, self._permutation = None, None

  def permutation(self, epoch: int) -> np.ndarray:
    if self._permutation_epoch != epoch:
      self._permutation = np.random.default_rng((self.seed, epoch)).permutation(len(self.rows))
      self._permutation_epoch = epoch
    return self._permutation

  def state(self) -> dict[str, int]:
    return {"epoch": int(self.epoch), "index": int(self.index), "rows": len(self.rows)}

  def restore(self, state: dict[str, Any]) -> None:
    rows = int(state.get("rows", len(self.rows)))
    if rows != len(self.rows):
      raise ValueError(f"the training data has {len(self.rows)} rows but the saved data state is for {rows} rows; "
                       "the corpus, tokenizer or data config changed")
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index < len(self.rows):
      raise ValueError(f"invalid data state {dict(state)!r}")
    self.epoch, self.index = epoch, index

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    picked, needed = [], self.batch_size
    while needed:
      take = self.permutation(self.epoch)[self.index:self.index + needed]
      picked.append(take)
      needed -= take.size
      self.index += take.size
      if self.index == len(self.rows):
        self.epoch, self.index = self.epoch + 1, 0
    return self.rows(np.concatenate(picked))


def eval_batch_list(rows: Rows, batch_size: int, max_batches: int | None) -> list[dict[str, np.ndarray]]:
  """The first ``max_batches`` batches of ``rows`` in order (all when None); the last is filled out."""
  n_rows = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
  batches = []
  for start in range(0, n_rows, batch_size):
    indices_B = np.arange(start, start + batch_size)
    n_real = min(batch_size, n_rows - start)
    batches.append(rows(np.minimum(indices_B, n_rows - 1), n_real=n_real))
  return batches


# ----------------------------------------------------------------------------- entry point


def checked_tokenizer(tokenizer, name: str, vocab_size: int):
  """``tokenizer`` if it fits the model's vocabulary, else ``ValueError`` naming both sizes."""
  if len(tokenizer) > vocab_size:
    raise ValueError(f"tokenizer {name!r} has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}")
  special_ids(tokenizer)  # has an eos
  return tokenizer


@dataclasses.dataclass
class Data:
  """What ``train.py`` / ``eval.py`` use: the tokenizer, the batches, special ids and sizes."""

  tokenizer: Any
  train: Batches
  eval_batches: list[dict[str, np.ndarray]]
  pad_id: int
  eos_id: int
  bos_id: int | None
  stats: dict[str, int]


def _corpus_name(spec: DataSpec) -> str:
  return "the embedded corpus" if spec.path is None else f"data.path {spec.path!r}"


def _recorded_start(spec: DataSpec, files, workdir: str, tokenizer, vocab_size: int):
  """``(tokenizer, token cache directory, document counts)`` when a token cache records this corpus state."""
  if tokenizer is None:  # trained by an earlier start, if the run has one
    trained = os.path.join(workdir, "tokenizer")
    if files is None or not os.path.isfile(os.path.join(trained, CORPUS_RECORD)):
      return None
    try:
      tokenizer = checked_tokenizer(load_tokenizer(trained), trained, vocab_size)
    except ValueError:
      return None  # reading the corpus again reports it, as a first start would
  found = recorded_cache(os.path.join(workdir, "data_cache"), corpus_state(spec, files, tokenizer, vocab_size))
  return None if found is None else (tokenizer, *found)


def _read_and_encode(spec: DataSpec, workdir: str, tokenizer, vocab_size: int):
  """``(tokenizer, token cache directory, document counts, arrays)``: the corpus read, split and encoded (the
  tokenizer trained first when the run has none), the tokens cached."""
  corpus = corpus_documents(spec)
  where = _corpus_name(spec)
  if not corpus.documents:
    raise ValueError(f"{where} has no text")
  train_docs, val_docs = split_documents(corpus.documents, spec.validation_fraction)
  if not train_docs or (spec.validation_fraction > 0 and not val_docs):
    raise ValueError(f"{where} leaves an empty split: {len(train_docs)} training and {len(val_docs)} validation "
                     f"documents (validation_fraction {spec.validation_fraction})")
  if tokenizer is None:
    tokenizer = checked_tokenizer(cached_tokenizer(workdir, train_docs, int(vocab_size)),
                                  os.path.join(workdir, "tokenizer"), vocab_size)
  splits = {"train": train_docs, "val": val_docs}
  directory = token_cache_dir(os.path.join(workdir, "data_cache"), tokenizer, splits)
  arrays = cached_tokens(directory, tokenizer, special_ids(tokenizer)[1], splits)
  documents = {"train_documents": len(train_docs), "val_documents": len(val_docs), "skipped_documents": corpus.skipped}
  return tokenizer, directory, documents, arrays


def build_data(data_config: Any, *, workdir: str, vocab_size: int, batch_size: int, seed: int = 0,
               eval_batch_size: int | None = None, eval_batches: int | None = 8) -> Data:
  """Corpus → split → tokenizer → cached tokens → ``Data``; bad input raises a one-line ``ValueError``.

  Args:
    data_config: the ``data`` config section (``path``, ``tokenizer``, ``seq_len``, ``packing``,
      ``validation_fraction``, ``max_documents``, ``max_bytes``, ``text_field``).
    workdir: run directory; holds ``tokenizer/`` (when trained here) and ``data_cache/``.
    vocab_size: the model's vocabulary; the tokenizer may not exceed it.
    batch_size: rows per training batch.
    seed: shuffling seed.
    eval_batch_size: rows per validation batch (default ``batch_size``).
    eval_batches: number of validation batches (None: all validation rows).
  """
  spec = data_spec(data_config)
  if vocab_size is None or int(vocab_size) <= 0:
    raise ValueError(f"vocab_size must be positive, got {vocab_size!r}")
  if eval_batch_size is not None and eval_batch_size <= 0:
    raise ValueError(f"eval_batch_size must be positive, got {eval_batch_size!r}")
  tokenizer = (None if spec.tokenizer is None else
               checked_tokenizer(load_tokenizer(spec.tokenizer), spec.tokenizer, vocab_size))
  files = corpus_files(spec.path)  # before reading: a file changed while it is read is not recorded as read
  recorded = _recorded_start(spec, files, workdir, tokenizer, vocab_size)
  if recorded is not None:  # the corpus has not changed since a start that recorded it: not read again
    tokenizer, directory, documents = recorded
    arrays = load_token_cache(directory, ["train", "val"])
  else:
    tokenizer, directory, documents, arrays = _read_and_encode(spec, workdir, tokenizer, vocab_size)
    record_corpus_state(directory, corpus_state(spec, files, tokenizer, vocab_size), documents)
  pad_id, eos_id, bos_id = special_ids(tokenizer)
  train_rows = Rows(*arrays["train"], spec.seq_len, spec.packing, pad_id)
  val_rows = Rows(*arrays["val"], spec.seq_len, spec.packing, pad_id)
  if len(train_rows) == 0:
    raise ValueError(f"{_corpus_name(spec)} has no training tokens to predict after tokenizing")
  stats = {**documents, "train_tokens": int(arrays["train"][0].size), "val_tokens": int(arrays["val"][0].size),
           "train_rows": len(train_rows), "val_rows": len(val_rows), "vocab_size": len(tokenizer)}
  return Data(tokenizer=tokenizer, train=Batches(train_rows, batch_size, seed),
              eval_batches=eval_batch_list(val_rows, eval_batch_size or batch_size, eval_batches),
              pad_id=pad_id, eos_id=eos_id, bos_id=bos_id, stats=stats)

"""A corpus's documents, read on demand: :class:`Corpus` and :func:`open_corpus`.

A corpus is never held in memory as a list of strings. Its text and JSON files are parsed once by HF
``datasets`` into memory-mapped arrow tables (in a temporary directory while the corpus is open; about the
uncompressed text's size), its parquet files are read in place, and each pass over the corpus (split, train
the tokenizer, fingerprint, encode) reads their rows again, a batch at a time, in the same order. So a first
start's host memory holds a batch of rows, not the corpus.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import itertools
import json
import lzma
import os
import sysconfig
import tempfile
import zlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from galore_jax.train.data.spec import DataSpec, one_line

DEFAULT_MAX_BYTES = 8_000_000  # the embedded corpus's cap when data.max_bytes is None
FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # of text and json files (C4's *.json.gz)
DECOMPRESSION_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)  # a broken link or a damaged compressed file
KIND_ORDER = ("text", "json", "parquet")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                              "encodings"})
ROWS_PER_READ = 1024  # rows converted to Python strings at a time


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The documents of a corpus, in order; each iteration is a new pass over its rows.

  A row is a document when its text is a string that is not only whitespace; the other rows are left out
  and counted as *skipped*. The caps keep a prefix: the first ``max_documents`` documents, then at most
  ``max_bytes`` UTF-8 bytes (the document that crosses the cap is cut to fit, on a character boundary).

  Attributes:
    read_rows: a new iterator over the texts of every row (any type), in order, on each call.
    max_documents: the cap on documents, or None.
    max_bytes: the cap on UTF-8 bytes, or None.
  """

  read_rows: Callable[[], Iterable[Any]]
  max_documents: int | None = None
  max_bytes: int | None = None

  def rows(self) -> Iterator[str | None]:
    """Each row read before the caps stop the reading: its document, or None for a row without text."""
    count, total = 0, 0
    for text in self.read_rows():
      if not (isinstance(text, str) and text.strip()):
        yield None
        continue
      if self.max_bytes is not None:
        data = text.encode("utf-8")
        if total + len(data) > self.max_bytes:
          head = data[:self.max_bytes - total].decode("utf-8", errors="ignore")
          if head.strip():
            yield head
          return
        total += len(data)
      yield text
      count += 1
      if count == self.max_documents or total == self.max_bytes:
        return

  def __iter__(self) -> Iterator[str]:
    return (document for document in self.rows() if document is not None)


class Documents(NamedTuple):
  """A corpus's documents in a list (small corpora, tests), and how many rows had no text."""

  documents: list[str]
  skipped: int = 0


def cap_documents(documents: Sequence[str], max_documents: int | None, max_bytes: int | None) -> list[str]:
  """The first ``max_documents`` documents, then a prefix of at most ``max_bytes`` UTF-8 bytes; as in a
  :class:`Corpus`, entries without text are left out."""
  return list(Corpus(lambda: documents, max_documents, max_bytes))


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


@contextlib.contextmanager
def open_corpus(spec: DataSpec, cache_dir: str | None = None) -> Iterator[Corpus]:
  """The capped :class:`Corpus` that ``spec`` names (the embedded stdlib corpus when ``spec.path`` is None).

  Valid inside the ``with`` block only; see :func:`open_files` for ``cache_dir`` and the errors.
  """
  if spec.path is None:
    max_bytes = spec.max_bytes or DEFAULT_MAX_BYTES
    documents = stdlib_documents(max_bytes)
    yield Corpus(lambda: documents, spec.max_documents, max_bytes)
    return
  with open_files(spec.path, spec.text_field, cache_dir) as corpus:
    yield dataclasses.replace(corpus, max_documents=spec.max_documents, max_bytes=spec.max_bytes)


@contextlib.contextmanager
def open_files(path: str, text_field: str = "text", cache_dir: str | None = None) -> Iterator[Corpus]:
  """The :class:`Corpus` of a text file, a folder of .txt/.jsonl/.json/.parquet files, or a ``save_to_disk`` dir.

  Text and JSON files may be compressed (``.gz``, ``.bz2``, ``.xz``: C4's ``c4-train.*.json.gz`` shards as
  downloaded). Parquet files (FineWeb's shards) are read in place.

  Uses HF ``datasets`` offline; the arrow tables it parses the files into go to ``cache_dir`` (default: a
  temporary directory, removed when the block ends). Raises ``ValueError`` naming ``path`` when it is
  missing, holds no readable files, cannot be parsed, or lacks the ``text_field`` column.
  """
  if not os.path.exists(path):
    raise ValueError(f"data.path {path!r} does not exist")
  with contextlib.ExitStack() as stack:
    if cache_dir is None:
      cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="galore_jax_datasets-"))
    sources = _row_sources(path, text_field, cache_dir)
    yield Corpus(lambda: itertools.chain.from_iterable(source() for source in sources))


def load_documents(path: str, text_field: str = "text", cache_dir: str | None = None) -> Documents:
  """Every document of :func:`open_files`'s corpus, in a list: for small corpora."""
  with open_files(path, text_field, cache_dir) as corpus:
    rows = list(corpus.rows())
  documents = [text for text in rows if text is not None]
  return Documents(documents, skipped=len(rows) - len(documents))


RowSource = Callable[[], Iterator[Any]]  # a new iterator over the texts of a table's rows, in order, per call


def _dataset_rows(dataset: Any, column: str) -> RowSource:
  def read():
    for batch in dataset.iter(batch_size=ROWS_PER_READ):
      yield from batch[column]

  return read


def _row_sources(path: str, text_field: str, cache_dir: str) -> list[RowSource]:
  """The tables of ``path`` in reading order: a saved dataset, or its text files, json files (both parsed by
  ``datasets`` into ``cache_dir``) and parquet files (read as they are, a batch of rows at a time)."""
  if _is_saved_dataset(path):
    with _quiet_offline_datasets() as datasets:
      try:
        saved = datasets.load_from_disk(path)
      except Exception as e:  # noqa: BLE001 - any failure is bad input here
        raise ValueError(f"data.path {path!r} is not a readable saved dataset ({one_line(e)})") from None
      if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved and len(saved) != 1:
          raise ValueError(f"data.path {path!r} is a DatasetDict without a 'train' split (splits: {list(saved)})")
        saved = saved["train"] if "train" in saved else next(iter(saved.values()))
      return [_dataset_rows(*_text_column(saved, text_field, repr(path)))]
  files = _files_by_kind(path)
  if not any(files.values()):
    raise ValueError(f"data.path {path!r} holds no .txt, .jsonl, .json or .parquet files (the first three may be "
                     f"compressed: {', '.join(COMPRESSIONS)})")
  sources = []
  for kind in ("text", "json"):
    for table, where in _parsed(path, kind, files[kind], cache_dir) if files[kind] else []:
      sources.append(_dataset_rows(*_text_column(table, text_field if kind == "json" else "text", where)))
  return sources + [_parquet_rows(path, file, text_field) for file in files["parquet"]]


def _parsed(path: str, kind: str, files: list[str], cache_dir: str) -> list[tuple[Any, str]]:
  """``(datasets table, how to name it)`` of the text or json ``files``: one table for all of them, or one per
  file when they do not make one (JSON files from different sources have different columns); a file that
  cannot be parsed is named."""
  def load(some_files):
    options = {"sample_by": "document"} if kind == "text" else {}
    return datasets.load_dataset(kind, data_files=some_files, split="train", cache_dir=cache_dir, **options)

  with _quiet_offline_datasets() as datasets:
    try:
      return [(load(files), f"the {kind} files of {path!r}")]
    except Exception as e:  # noqa: BLE001 - any failure is bad input here
      culprit = _unreadable_file(kind, files)
      if culprit:
        raise ValueError(f"data.path {path!r}: {culprit}") from None
      if len(files) == 1:
        raise ValueError(f"data.path {path!r}: file {files[0]!r} cannot be read ({one_line(e)})") from None
    tables = []
    for file in files:  # each file alone: their columns may differ
      try:
        tables.append((load([file]), f"the {kind} file {file!r}"))
      except Exception as e:  # noqa: BLE001 - any failure is bad input here
        raise ValueError(f"data.path {path!r}: file {file!r} cannot be read ({one_line(e)})") from None
    return tables


def _parquet_rows(path: str, file: str, text_field: str) -> RowSource:
  """A parquet file's ``text_field``, read in place (no copy), a batch of rows at a time; its footer is read
  now, so that a file that is not parquet or lacks the column is named before any pass."""
  import pyarrow
  import pyarrow.parquet

  problem = _parquet_problem(file)
  if problem:
    raise ValueError(f"data.path {path!r}: file {file!r} {problem}")
  columns = pyarrow.parquet.read_schema(file).names
  if text_field not in columns:
    raise ValueError(f"data.text_field {text_field!r} is not a column of the parquet file {file!r} "
                     f"(columns: {columns})")

  opened = _file_state(file)

  def read():
    if _file_state(file) != opened:  # the passes over a corpus must read the same rows
      raise ValueError(f"data.path {path!r}: file {file!r} changed while it was read; start again")
    try:
      with pyarrow.parquet.ParquetFile(file) as table:
        for batch in table.iter_batches(batch_size=ROWS_PER_READ, columns=[text_field]):
          yield from batch.column(0).to_pylist()
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as e:
      raise ValueError(f"data.path {path!r}: file {file!r} cannot be read ({one_line(e)})") from None

  return read


def _file_state(file: str) -> tuple[int, int] | None:
  try:
    stat = os.stat(file)
  except OSError:
    return None
  return stat.st_size, stat.st_mtime_ns


def _text_column(dataset: Any, text_field: str, where: str) -> tuple[Any, str]:
  if text_field not in dataset.column_names:
    raise ValueError(f"data.text_field {text_field!r} is not a column of {where} (columns: {dataset.column_names})")
  return dataset.select_columns([text_field]), text_field


def _is_saved_dataset(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json", "dataset_info.json"))


def file_kind(name: str) -> str | None:
  """``text``, ``json`` or ``parquet`` by the file's extension (under a compression's: ``c4-…json.gz`` is json)."""
  stem, extension = os.path.splitext(name.lower())
  if extension in COMPRESSIONS:
    kind = FILE_KINDS.get(os.path.splitext(stem)[1])
    return kind if kind != "parquet" else None
  return FILE_KINDS.get(extension)


def _files_by_kind(path: str) -> dict[str, list[str]]:
  """Readable corpus files under ``path`` grouped by kind, each list sorted by relative path."""
  found: dict[str, list[str]] = {kind: [] for kind in KIND_ORDER}
  if os.path.isfile(path):
    found[file_kind(os.path.basename(path)) or "text"].append(path)  # an explicit file of any name: text
    return found
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for name in filenames:
      kind = file_kind(name)
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


def _unreadable_file(kind: str, files: Sequence[str]) -> str | None:
  """Why the first unreadable file of ``files`` cannot be read, in words naming it; None if none is found.

  ``datasets`` reports a bad file as a generic DatasetGenerationError without its name: this re-reads the
  text or json files (only after a failure) to say which one is not UTF-8 text or which JSON line does not
  parse.
  """
  for path in files:
    problem = _text_problem(path, json_lines=kind == "json")
    if problem:
      return f"file {path!r} {problem}"
  return None


def _open_binary(path: str):
  """The file's bytes, decompressed when its extension names a compression."""
  return COMPRESSIONS.get(os.path.splitext(path.lower())[1], open)(path, "rb")


def _text_problem(path: str, json_lines: bool) -> str | None:
  """``is not UTF-8 text (...)``, ``line N is not a JSON object (...)``, ``cannot be read (...)`` (a broken link,
  a damaged compressed file); None when the file reads."""
  bad_line = None
  try:
    with _open_binary(path) as f:
      for number, raw in enumerate(f, start=1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          return f"is not UTF-8 text (line {number} has byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        if json_lines and bad_line is None and line.strip():
          bad_line = _json_line_problem(line, number)
  except DECOMPRESSION_ERRORS as e:
    return f"cannot be read ({getattr(e, 'strerror', None) or e})"
  if bad_line and not _is_one_json_document(path):  # datasets also reads a .json file holding one list/object
    return bad_line
  return None


def _json_line_problem(line: str, number: int) -> str | None:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    return f"line {number} is not valid JSON ({e.msg} at column {e.colno})"
  return None if isinstance(row, dict) else f"line {number} is a JSON {type(row).__name__}, not an object"


def _is_one_json_document(path: str) -> bool:
  """Whether the file is one JSON object or list, which ``datasets`` reads as rows (a lone string it cannot)."""
  try:
    with _open_binary(path) as f:
      return isinstance(json.load(f), (dict, list))
  except (ValueError, *DECOMPRESSION_ERRORS):
    return False


def _parquet_problem(path: str) -> str | None:
  import pyarrow.parquet

  try:
    pyarrow.parquet.ParquetFile(path)
    return None
  except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
    return f"is not a readable parquet file ({one_line(e)})"

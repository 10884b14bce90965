"""What train.py's data pipeline costs per corpus size: the first start (train the tokenizer, encode, write the token
cache) and a later one on the unchanged corpus (load the cache), in seconds and peak host memory.

  python -m bench.data_pipeline [--megabytes 100] [--corpus PATH] [--vocab 32000] [--seq_len 256]
                                [--tokenizer_train_mb 1000] [--out PATH]

The corpus is `--corpus` (any `data.path`), or a synthetic JSON-lines one of `--megabytes` MB: documents of 20-200
consecutive non-blank lines of this Python's standard library, drawn with a fixed seed (real code and prose, no
duplicates). Each start runs `data.build_data` in a fresh process with a fresh workdir for the first one; its peak
resident memory is read from the process itself, with the peak after importing the libraries (`import_rss_gb`)
beside it; `data_rss_gb`, their difference, is what the data took; `data_private_gb` is the same for the private
memory (Linux's RssAnon, without the pages of memory-mapped files). Writes
bench/results/data_pipeline-<backend>-<size>[-tokenizer<MB>].json (the suffix when --tokenizer_train_mb is not
the pipeline's default); its stats give the validation text's bytes per token, how well the tokenizer compresses.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile

from bench import common
from galore_jax.train.data.spec import DEFAULT_TOKENIZER_TRAIN_BYTES

DEFAULT_TOKENIZER_TRAIN_MB = DEFAULT_TOKENIZER_TRAIN_BYTES // 1_000_000

# Run in a child process: its peak memory is the pipeline's alone. The libraries build_data imports come first.
# Resident memory (ru_maxrss) counts the pages of memory-mapped files read (the arrow tables, the token cache),
# which the kernel drops under pressure and reads again; the private memory (RssAnon, sampled every 50 ms)
# is what a host must really have.
CHILD = """
import inspect, json, resource, sys, threading, time
import datasets, tokenizers, transformers
from galore_jax.train import data

def private_bytes():
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
  except (OSError, StopIteration):
    return None

imported_private = private_bytes()
peak_private = [imported_private, imported_private]  # the whole start's, the current step's

def watch():
  while True:
    now = private_bytes()
    peak_private[:] = [max(peak_private[0], now), max(peak_private[1], now)]
    time.sleep(0.05)

if imported_private is not None:
  threading.Thread(target=watch, daemon=True).start()
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
steps = []

def progress(line):  # each line the pipeline prints ends a step: when, and the step's peak private memory
  steps.append({"line": line, "seconds": time.perf_counter() - start,
                "peak_private_gb": None if imported_private is None else peak_private[1] / 1e9})
  if imported_private is not None:
    peak_private[1] = private_bytes()

options = {"progress": progress} if "progress" in inspect.signature(data.build_data).parameters else {}
built = data.build_data(json.loads(sys.argv[1]), workdir=sys.argv[2], vocab_size=int(sys.argv[3]), batch_size=8,
                        **options)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
private = {} if imported_private is None else {"import_private_gb": imported_private / 1e9,
                                               "peak_private_gb": max(peak_private[0], private_bytes()) / 1e9}
print(json.dumps({"seconds": seconds, "import_rss_gb": imported * 1024 / 1e9, "peak_rss_gb": peak * 1024 / 1e9,
                  **private, **({"steps": steps} if options else {}), "stats": built.stats}))
"""


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--megabytes", type=common.int_within(1), default=100, help="size of the synthetic corpus")
  ap.add_argument("--corpus", default=None, help="measure this data.path instead of a synthetic corpus")
  ap.add_argument("--vocab", type=common.int_within(259), default=32000, help="the trained tokenizer's vocab_size")
  ap.add_argument("--seq_len", type=common.int_within(1), default=256)
  ap.add_argument("--tokenizer_train_mb", type=common.int_within(0), default=DEFAULT_TOKENIZER_TRAIN_MB,
                  help="data.tokenizer_train_bytes in MB: the sample the tokenizer learns from; 0 = the whole split")
  ap.add_argument("--out", default=None, help="default bench/results/data_pipeline-<backend>-<size>.json")
  return ap


def stdlib_lines() -> list[str]:
  """The non-blank lines of this Python's standard library sources (no tests, no site-packages), in a fixed order."""
  root, lines = sysconfig.get_paths()["stdlib"], []
  for directory, subdirectories, files in sorted(os.walk(root)):
    subdirectories[:] = sorted(d for d in subdirectories if d not in ("test", "tests", "site-packages"))
    for name in sorted(files):
      if name.endswith(".py"):
        with open(os.path.join(directory, name), encoding="utf-8", errors="ignore") as f:
          lines += [line for line in f.read().splitlines() if line.strip()]
  return lines


def write_corpus(path: str, megabytes: int, seed: int = 0) -> int:
  """A JSON-lines corpus of at least ``megabytes`` MB of text at ``path``; its number of documents."""
  lines, rng = stdlib_lines(), random.Random(seed)
  written = documents = 0
  with open(path, "w") as f:
    while written < megabytes * 1_000_000:
      count = rng.randint(20, 200)
      start = rng.randrange(len(lines) - count)
      text = f"# document {documents}\n" + "\n".join(lines[start:start + count])
      f.write(json.dumps({"text": text}) + "\n")
      written, documents = written + len(text.encode("utf-8")), documents + 1
  return documents


def start(corpus: str, workdir: str, vocab: int, seq_len: int, tokenizer_train_bytes: int) -> dict:
  """One start of the pipeline in a fresh process: seconds, peak memory, the data's stats."""
  config = {"path": corpus, "tokenizer": None, "seq_len": seq_len, "packing": True, "validation_fraction": 0.01,
            "max_documents": None, "max_bytes": None, "text_field": "text",
            "tokenizer_train_bytes": tokenizer_train_bytes}
  done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config), workdir, str(vocab)], cwd=common.ROOT,
                        capture_output=True, text=True)
  if done.returncode:
    common.fail(f"the data pipeline failed on {corpus!r}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def corpus_bytes(path: str) -> int:
  """The corpus's size on disk: the file, or every file under the folder."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, name)) for d, _, files in os.walk(path) for name in files)


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  if args.corpus is not None and not os.path.exists(args.corpus):
    common.fail(f"--corpus {args.corpus!r} does not exist")
  with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
    corpus = args.corpus or os.path.join(scratch, "corpus.jsonl")
    if args.corpus is None:
      print(f"writing a {args.megabytes} MB synthetic corpus", flush=True)
      write_corpus(corpus, args.megabytes)
    workdir = os.path.join(scratch, "workdir")
    phases = {}
    for phase in ("first_start", "later_start"):
      phases[phase] = start(corpus, workdir, args.vocab, args.seq_len, args.tokenizer_train_mb * 1_000_000)
      print(f"{phase}: {phases[phase]['seconds']:.1f} s, peak {phases[phase]['peak_rss_gb']:.2f} GB", flush=True)
    size = corpus_bytes(corpus)
  stats = phases["first_start"].pop("stats")
  phases["later_start"].pop("stats")
  for phase in phases.values():
    phase["data_rss_gb"] = phase["peak_rss_gb"] - phase["import_rss_gb"]
    if "peak_private_gb" in phase:
      phase["data_private_gb"] = phase["peak_private_gb"] - phase["import_private_gb"]
  record = {**common.provenance("bench.data_pipeline", argv),
            "corpus": args.corpus or f"synthetic: {args.megabytes} MB of standard-library lines, JSON lines",
            "corpus_bytes": size, "vocab_size": args.vocab, "seq_len": args.seq_len,
            "tokenizer_train_bytes": args.tokenizer_train_mb * 1_000_000 or None, "stats": stats, "phases": phases}
  label = f"{args.megabytes}mb" if args.corpus is None else os.path.basename(os.path.normpath(args.corpus))
  if args.tokenizer_train_mb != DEFAULT_TOKENIZER_TRAIN_MB:
    label += f"-tokenizer{args.tokenizer_train_mb}mb" if args.tokenizer_train_mb else "-tokenizer-all"
  out = args.out or os.path.join(common.RESULTS, f"data_pipeline-{record['backend']}-{label}.json")
  print(f"wrote {common.write_json(out, record)}")
  return record


if __name__ == "__main__":
  main()

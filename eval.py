"""Evaluate a training run's checkpoint: loss and perplexity on text, a sample, optional HF export.

  python eval.py --workdir workdir/tiny [--step N] [--prompt "def main("] [--export_hf DIR]
  python eval.py --workdir workdir/tiny --data_path held_out.jsonl [--batches 0]   # other text, every row

Restores the parameters only (no optimizer state is read) against the model the run's saved
config builds. By default the text is the run's validation split, so the loss is the ``eval_loss`` the
run logged (``galore_jax/train/eval_data.py``). Reads the workdir and writes nothing there: the tokens are
encoded in memory when the run's token cache does not hold them, ``--export_hf`` must be outside it, and
it never overwrites a config.json that is not a transformers model's. Any problem with the arguments or
the workdir (no config.json or an unreadable one, no checkpoint, a damaged one) is one line
``error: ...`` and exit code 2, before anything is written.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Prompt for the sample generation.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate for the sample.")
_EXPORT_HF = flags.DEFINE_string("export_hf", None, "Write a transformers-loadable checkpoint here.")
_DATA_PATH = flags.DEFINE_string("data_path", None, "Score this corpus instead of the run's data.path (one that "
                                 "moved, or held-out text); the run's data caps apply.")
_SPLIT = flags.DEFINE_enum("split", None, ["validation", "all"], "Which documents: the run's validation split "
                           "or all (default: all with --data_path, else validation).")
_TEXT_FIELD = flags.DEFINE_string("text_field", None, "The field of --data_path's json/parquet rows that holds "
                                  "the text (default: the run's data.text_field).")
_BATCHES = flags.DEFINE_integer("batches", None, "How many batches to score, the first in order; 0 for every "
                                "row (default: the run's eval.batches).")
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def evaluate(workdir: str, step: int | None, prompt: str, max_new_tokens: int, export_hf: str | None,
             data_path: str | None = None, split: str | None = None, text_field: str | None = None,
             batches: int | None = None) -> dict:
  import jax
  from flax import nnx

  from galore_jax.train import checkpoint, config, eval_data, metrics, restore, steps
  from galore_jax.models import hf, llama

  checkpoint.quiet_orbax_logging()
  try:
    model, cfg, step = restore.restore_run(workdir, step)
    batch_size = cfg.eval.batch_size or cfg.train.batch_size // cfg.train.grad_accum
    dataset = eval_data.build_eval_data(cfg.data, workdir=workdir, vocab_size=config.model_config(cfg).vocab_size,
                                        batch_size=batch_size,
                                        batches=cfg.eval.batches if batches is None else (batches or None),
                                        data_path=data_path, split=split, text_field=text_field)
  except (config.ConfigError, checkpoint.CheckpointMismatch, checkpoint.CheckpointDamaged, ValueError) as e:
    fail(str(e))  # RunNotLoadable is a ValueError
  prompt_ids = dataset.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [dataset.eos_id]
  limit = model.config.max_position_embeddings
  if len(prompt_ids) + max_new_tokens > limit:
    fail(f"the --prompt's {len(prompt_ids)} tokens plus --max_new_tokens {max_new_tokens} exceed the model's "
         f"max_position_embeddings {limit}")
  print(scoring_line(dataset, batch_size), flush=True)
  graphdef, params = nnx.split(model)

  eval_step = jax.jit(lambda p, b: steps.loss_and_tokens(nnx.merge(graphdef, p), b, cfg.data.packing))
  eval_loss, tokens = metrics.validation_loss(lambda batch: eval_step(params, batch), dataset.batches)

  out = llama.generate(model, [prompt_ids], max_new_tokens=max_new_tokens)
  sample = dataset.tokenizer.decode(list(map(int, out[0])))
  if export_hf:
    try:
      hf.to_hf(model, export_hf, tokenizer=dataset.tokenizer)
    except (OSError, ValueError) as e:
      fail(f"--export_hf {export_hf!r}: {e}")
  return {"step": step, "eval_loss": eval_loss,
          "eval_ppl": None if eval_loss is None else metrics.perplexity(eval_loss), "eval_tokens": tokens,
          "eval_source": dataset.source, "eval_documents": dataset.documents, "empty_because": dataset.empty_because,
          "sample": sample, "export_hf": export_hf}


def scoring_line(dataset, batch_size: int) -> str:
  """What is scored: ``scoring <source>: N documents, T tokens; B of its R batches of S rows[; rows left out]``,
  or, when the reading stopped once the batches asked for were full, ``its first N documents (T tokens) fill
  the B batches of S rows asked for``."""
  count = lambda n, noun, nouns=None: f"{n:,} " + (noun if n == 1 else nouns or noun + "s")
  skipped = f"; {count(dataset.skipped, 'row')} of the corpus without text left out" if dataset.skipped else ""
  if not dataset.complete:
    first = "its first document" if dataset.documents == 1 else f"its first {dataset.documents:,} documents"
    return (f"scoring {dataset.source}: {first} ({count(dataset.tokens, 'token')}) fill"
            f"{'s' if dataset.documents == 1 else ''} the {count(len(dataset.batches), 'batch', 'batches')} of "
            f"{batch_size} rows asked for{skipped}")
  batches = count(-(-dataset.rows // batch_size), "batch", "batches")
  return (f"scoring {dataset.source}: {count(dataset.documents, 'document')}, {count(dataset.tokens, 'token')}; "
          f"{len(dataset.batches)} of its {batches} of {batch_size} rows{skipped}")


def check_arguments(workdir: str, max_new_tokens: int, export_hf: str | None, data_path: str | None = None,
                    batches: int | None = None, text_field: str | None = None) -> None:
  """The flags' own errors, before anything is loaded (a bad --export_hf must not cost an evaluation first)."""
  if not os.path.isdir(workdir):
    fail(f"--workdir {workdir!r} " + ("is not a directory" if os.path.exists(workdir) else "does not exist"))
  if max_new_tokens < 0:
    fail(f"--max_new_tokens must be >= 0, got {max_new_tokens}")
  if batches is not None and batches < 0:
    fail(f"--batches must be >= 0 (0: every row), got {batches}")
  if text_field is not None and not text_field.strip():
    fail(f"--text_field must name a field, got {text_field!r}")
  run = os.path.realpath(workdir)
  if data_path is not None:
    if not os.path.exists(data_path):
      fail(f"--data_path {data_path!r} does not exist")
    if os.path.commonpath([run, os.path.realpath(data_path)]) == run:
      fail(f"--data_path {data_path!r} is inside the workdir {workdir!r}, which holds the run's files, not text "
           "to score")
  if not export_hf:
    return
  from galore_jax.models import hf

  target = os.path.realpath(export_hf)
  if os.path.commonpath([run, target]) == run:
    fail(f"--export_hf {export_hf!r} is inside the workdir {workdir!r}, which eval.py does not write to; "
         "give a directory outside it")
  try:
    hf.check_export_dir(export_hf)
  except ValueError as e:
    fail(f"--export_hf {e}")
  existing = target
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK):
    fail(f"--export_hf {export_hf!r}: {existing!r} is not writable")


def main() -> None:
  try:
    positional = flags.FLAGS(sys.argv)[1:]
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if positional:  # absl would ignore it: a corpus given without --data_path= would go unscored, unnoticed
    fail(f"unexpected argument {positional[0]!r}: eval.py takes flags only (--workdir=DIR, --data_path=PATH, ...)")
  if not _WORKDIR.value:
    fail("--workdir is required")
  check_arguments(_WORKDIR.value, _MAX_NEW_TOKENS.value, _EXPORT_HF.value, _DATA_PATH.value, _BATCHES.value,
                  _TEXT_FIELD.value)
  result = evaluate(_WORKDIR.value, _STEP.value, _PROMPT.value, _MAX_NEW_TOKENS.value, _EXPORT_HF.value,
                    data_path=_DATA_PATH.value, split=_SPLIT.value, text_field=_TEXT_FIELD.value,
                    batches=_BATCHES.value)
  if result["eval_loss"] is None:
    print(f"step {result['step']}: no token to predict in {result['eval_source']}: {result['empty_because']}")
  else:
    print(f"step {result['step']}: eval_loss {result['eval_loss']:.4f}, eval_ppl {result['eval_ppl']:.2f}")
  print(f"sample: {result['sample']!r}")
  if result["export_hf"]:
    print(f"exported to {result['export_hf']}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()

"""Evaluate a training run's checkpoint: validation loss and perplexity, a sample, optional HF export.

  python eval.py --workdir workdir/tiny [--step N] [--prompt "def main("] [--export_hf DIR]

Restores the parameters only (no optimizer state is read) against the model the run's saved
config builds. Reads the workdir and writes nothing there (only ``--export_hf``'s directory). Any
problem with the workdir (no config.json or an unreadable one, no checkpoint, a damaged one) is one
line ``error: ...`` and exit code 2.
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
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def evaluate(workdir: str, step: int | None, prompt: str, max_new_tokens: int, export_hf: str | None) -> dict:
  import jax
  from flax import nnx

  from galore_jax.train import checkpoint, config, data, metrics, restore, steps
  from galore_jax.models import hf, llama

  checkpoint.quiet_orbax_logging()
  try:
    model, cfg, step = restore.restore_run(workdir, step)
    model_cfg = config.model_config(cfg)
    dataset = data.build_data(cfg.data, workdir=workdir, vocab_size=model_cfg.vocab_size,
                              batch_size=cfg.train.batch_size,
                              eval_batch_size=cfg.eval.batch_size or cfg.train.batch_size // cfg.train.grad_accum,
                              eval_batches=cfg.eval.batches, seed=cfg.seed)
  except (config.ConfigError, checkpoint.CheckpointMismatch, checkpoint.CheckpointDamaged, ValueError) as e:
    fail(str(e))  # RunNotLoadable is a ValueError
  graphdef, params = nnx.split(model)

  eval_step = jax.jit(lambda p, b: steps.loss_and_tokens(nnx.merge(graphdef, p), b, cfg.data.packing))
  loss_sum = tokens = 0.0
  for batch in dataset.eval_batches:
    l, t = eval_step(params, batch)
    loss_sum, tokens = loss_sum + float(l), tokens + float(t)
  eval_loss = loss_sum / max(tokens, 1.0)

  prompt_ids = dataset.tokenizer(prompt, add_special_tokens=False)["input_ids"] or [dataset.eos_id]
  out = llama.generate(model, [prompt_ids], max_new_tokens=max_new_tokens)
  sample = dataset.tokenizer.decode(list(map(int, out[0])))
  if export_hf:
    hf.to_hf(model, export_hf, tokenizer=dataset.tokenizer)
  return {"step": step, "eval_loss": eval_loss, "eval_ppl": metrics.perplexity(eval_loss), "eval_tokens": tokens,
          "sample": sample, "export_hf": export_hf}


def main() -> None:
  try:
    flags.FLAGS(sys.argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if not _WORKDIR.value:
    fail("--workdir is required")
  if not os.path.isdir(_WORKDIR.value):
    fail(f"--workdir {_WORKDIR.value!r} does not exist")
  result = evaluate(_WORKDIR.value, _STEP.value, _PROMPT.value, _MAX_NEW_TOKENS.value, _EXPORT_HF.value)
  print(f"step {result['step']}: eval_loss {result['eval_loss']:.4f}, eval_ppl {result['eval_ppl']:.2f}")
  print(f"sample: {result['sample']!r}")
  if result["export_hf"]:
    print(f"exported to {result['export_hf']}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()

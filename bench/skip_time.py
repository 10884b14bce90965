"""What skipping non-finite steps costs in time: the train step unguarded, skipping inside the optimizer (``finite=``,
``train.py``'s way, ``galore_jax.optim.guard``) and skipping by a select after the update, timed side by side.

  python -m bench.skip_time [--preset llama_20m] [--tokens 1024] [--variants a,b] [--rounds 5] [--out PATH]

Each variant is one of ``bench.memory``'s whole-tree ones (its optimizer, bf16 weights, remat). The three steps
are compiled first, then timed in ``--rounds`` interleaved rounds (each a warm call and 3 timed ones) on the same
weights, state and random batch, so a slower moment of a shared machine falls on all three. "after" is the step
that a transformation not honouring ``finite`` gets: its state selected after its update. Writes
``bench/results/skip_time-<backend>-<preset>.json``.
"""

from __future__ import annotations

import statistics
import sys

from bench import common, memory

GUARDS = ("unguarded", "inside", "after")
WHOLE_TREE = [v for v in memory.VARIANTS if not memory.VARIANTS[v].get("layerwise")]
DEFAULT_VARIANTS = ["galore_adamw (fp32 states)", "galore_adamw (bf16 states)"]


def without_finite(tx):
  """``tx`` as a transformation that does not honour ``finite``: the guard then selects its state after it."""
  import optax

  return optax.GradientTransformationExtraArgs(tx.init, lambda u, s, p=None, **extra: tx.update(u, s, p, **extra))


def compiled_steps(cfg, graphdef, tx, params, opt_state, batch) -> dict:
  import jax

  from galore_jax.train import steps

  out = {}
  for guard in GUARDS:
    step = steps.make_steps(graphdef, without_finite(tx) if guard == "after" else tx, grad_accum=1,
                            packed=cfg.data.packing, skip_nonfinite=guard != "unguarded").train
    # jitted again without donation: every call reads the same weights and state
    out[guard] = jax.jit(step.__wrapped__).lower(params, opt_state, batch).compile()
  return out


def time_variant(preset: str, tokens: int, variant: str, rounds: int) -> dict:
  import jax
  from flax import nnx

  from galore_jax.train import config, steps

  cfg = memory.config_for(preset, tokens, memory.VARIANTS[variant])
  model, tx = config.build_model(cfg, seed=0), config.build_optimizer(cfg)
  params = steps.params_of(model)
  opt_state = tx.init(params)
  batch = jax.tree.map(jax.numpy.asarray, common.random_batch(cfg.train.batch_size, cfg.data.seq_len,
                                                               config.model_config(cfg).vocab_size))
  fns = compiled_steps(cfg, nnx.graphdef(model), tx, params, opt_state, batch)
  samples = {guard: [] for guard in GUARDS}
  for _ in range(rounds):
    for guard in GUARDS:
      samples[guard] += common.timings(fns[guard], params, opt_state, batch, warmup=1, repeats=3)
  row = {"preset": preset, "variant": variant, "tokens_per_step": tokens,
         **{f"{guard}_s": common.summary(samples[guard]) for guard in GUARDS}}
  for guard in GUARDS[1:]:
    row[f"{guard}_vs_unguarded"] = statistics.median(samples[guard]) / statistics.median(samples["unguarded"])
  return row


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_20m", choices=sorted(common.PRESETS))
  ap.add_argument("--tokens", type=common.int_within(1), default=1024, help="tokens per step")
  ap.add_argument("--variants", default=common.SEPARATOR.join(DEFAULT_VARIANTS),
                  help="comma-separated subset of: " + ", ".join(WHOLE_TREE))
  ap.add_argument("--rounds", type=common.int_within(1), default=5)
  ap.add_argument("--out", default=None, help="default bench/results/skip_time-<backend>-<preset>.json")
  return ap


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  variants = common.choose(args.variants, WHOLE_TREE, "variant")
  record = {**common.provenance(__spec__.name, argv), "results": []}
  out = args.out or f"{common.RESULTS}/skip_time-{record['backend']}-{args.preset}.json"
  for variant in variants:
    row = time_variant(args.preset, args.tokens, variant, args.rounds)
    record["results"].append(row)
    print(f"{args.preset} {variant:<28} step: unguarded {row['unguarded_s']['median']:.4f} s, inside "
          f"{row['inside_vs_unguarded']:.3f}x, after {row['after_vs_unguarded']:.3f}x", flush=True)
    common.write_json(out, record)
  return record


if __name__ == "__main__":
  main()

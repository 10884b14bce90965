"""8-bit Adam's update of one large leaf, whole and chunk by chunk: XLA's temporaries and the time, side by side.

  python -m bench.adam8bit_chunks [--shape 32000 4096] [--dtypes bfloat16 float32] [--chunk_sizes 0 4194304]
                                  [--rounds 5] [--out PATH]

``scale_by_adam_8bit(chunk_size=...)`` on one leaf of ``--shape`` (default: Llama's embedding), 0 meaning the whole
leaf at once. Temporaries from XLA's memory analysis of the update compiled with the gradient and state donated
(as a train step donates them); times of the same update without donation, in ``--rounds`` interleaved rounds
(each a warm call and 3 timed ones) so that a slower moment of a shared machine falls on every variant.
Writes ``bench/results/adam8bit_chunks-<backend>.json``.
"""

from __future__ import annotations

import statistics
import sys

from bench import common


def compiled(dtype: str, shape: tuple[int, ...], chunk_size: int, donate: bool):
  import jax

  from galore_jax.optim import scale_by_adam_8bit

  tx = scale_by_adam_8bit(chunk_size=chunk_size or None)
  grads = {"w": jax.ShapeDtypeStruct(shape, dtype)}
  state = jax.eval_shape(tx.init, grads)
  return jax.jit(tx.update, donate_argnums=(0, 1) if donate else ()).lower(grads, state).compile(), tx


def measure(dtype: str, shape: tuple[int, ...], chunk_sizes: list[int], rounds: int) -> list[dict]:
  import jax

  rows, fns = [], {}
  grads = {"w": jax.random.normal(jax.random.key(0), shape, dtype)}
  for chunk_size in chunk_sizes:
    memory = compiled(dtype, shape, chunk_size, donate=True)[0].memory_analysis()
    fn, tx = compiled(dtype, shape, chunk_size, donate=False)
    _, state = fn(grads, tx.init(grads))  # a state with nonzero moments
    fns[chunk_size] = (fn, state)
    rows.append({"dtype": dtype, "shape": list(shape), "chunk_size": chunk_size,
                 "temp_gb": memory.temp_size_in_bytes / 1e9})
  samples = {chunk_size: [] for chunk_size in chunk_sizes}
  for _ in range(rounds):
    for chunk_size, (fn, state) in fns.items():
      samples[chunk_size] += common.timings(fn, grads, state, warmup=1, repeats=3)
  whole = statistics.median(samples[chunk_sizes[0]])
  for row in rows:
    row["update_s"] = common.summary(samples[row["chunk_size"]])
    row[f"vs_chunk_size_{chunk_sizes[0]}"] = row["update_s"]["median"] / whole
  return rows


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--shape", type=common.int_within(1), nargs="+", default=[32000, 4096])
  ap.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"])
  ap.add_argument("--chunk_sizes", type=common.int_within(0), nargs="+", default=[0, 1 << 22],
                  help="elements per chunk; 0: the whole leaf; the first is the ratios' baseline")
  ap.add_argument("--rounds", type=common.int_within(1), default=5)
  ap.add_argument("--out", default=None, help="default bench/results/adam8bit_chunks-<backend>.json")
  return ap


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  if any(0 < size < 256 for size in args.chunk_sizes):
    common.fail(f"--chunk_sizes {args.chunk_sizes}: each is 0 (the whole leaf) or at least a block (256)")
  record = {**common.provenance(__spec__.name, argv), "results": []}
  out = args.out or f"{common.RESULTS}/adam8bit_chunks-{record['backend']}.json"
  for dtype in args.dtypes:
    for row in measure(dtype, tuple(args.shape), args.chunk_sizes, args.rounds):
      record["results"].append(row)
      print(f"{dtype} {tuple(args.shape)} chunk_size {row['chunk_size']}: temporaries {row['temp_gb']:.3f} GB, "
            f"update {row['update_s']['median']:.3f} s ({row[f'vs_chunk_size_{args.chunk_sizes[0]}']:.2f}x)",
            flush=True)
    common.write_json(out, record)
  return record


if __name__ == "__main__":
  main()

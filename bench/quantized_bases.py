"""Q-GaLore's INT4 bases against fp32 and bf16 ones: bytes, and how far the update moves, per kernel shape.

  python -m bench.quantized_bases [--preset llama_9m] [--group_size 256] [--seeds 3] [--out PATH]

Writes bench/results/quantized_bases-<backend>.json. For each attention / MLP kernel shape of one decoder layer of
``--preset`` (rank: the preset's run config, ``hidden_size // 4`` unless a paper config says otherwise) and each
seed, a gradient ``G`` is drawn as a rank-8 signal plus Gaussian noise (gradients of trained models are close to
low rank; this is not a real gradient), and the first update is computed with fp32, bf16 and int4 bases:

* ``projection``: ``galore(optax.identity())``, i.e. ``α Q Qᵀ G``, whose error is linear in the basis error;
* ``adamw``: ``galore_adamw``'s first update (Adam's first step is about ``sign(QᵀG)``, so a small basis error can
  flip the sign of small coordinates: the error is larger and not linear).

Reported: the basis bytes of each dtype (``introspect.tree_bytes`` of the state's bases) and the relative update
error ``‖U_dtype − U_fp32‖ / ‖U_fp32‖`` (mean and max over seeds). CPU is enough; nothing is timed.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from galore_jax import galore, galore_adamw
from galore_jax.models import llama
from galore_jax.optim.introspect import tree_bytes

DTYPES = ("float32", "bfloat16", "int4")


def gradient(shape: tuple[int, int], seed: int) -> jax.Array:
  """A rank-8 signal plus noise at a tenth of its scale, fp32."""
  rng = np.random.default_rng(seed)
  m, n = shape
  signal = rng.normal(size=(m, 8)) @ rng.normal(size=(8, n)) / np.sqrt(8)
  return jnp.asarray(signal + 0.1 * rng.normal(size=shape), jnp.float32)


def updates(g: jax.Array, rank: int, group_size: int) -> dict[str, dict]:
  """Per basis dtype: the bases' bytes and the first update of each method."""
  params = {"attn": jnp.zeros_like(g)}
  out = {}
  for dtype in DTYPES:
    options = dict(rank=rank, update_proj_gap=200, basis_dtype=dtype, basis_group_size=group_size)
    projection = galore(optax.identity(), **options)
    u_proj, state = projection.update({"attn": g}, projection.init(params))
    adam = galore_adamw(1e-2, **options)
    u_adam, _ = adam.update({"attn": g}, adam.init(params), params)
    out[dtype] = {"basis_bytes": tree_bytes(state.bases), "projection": np.asarray(u_proj["attn"], np.float64),
                  "adamw": np.asarray(u_adam["attn"], np.float64)}
  return out


def shape_row(name: str, shape: tuple[int, int], rank: int, group_size: int, seeds: int) -> dict:
  errors = {(d, method): [] for d in DTYPES[1:] for method in ("projection", "adamw")}
  for seed in range(seeds):
    result = updates(gradient(shape, seed), rank, group_size)
    for dtype, method in errors:
      ref = result["float32"][method]
      errors[dtype, method].append(float(np.linalg.norm(result[dtype][method] - ref) / np.linalg.norm(ref)))
  row = {"kernel": name, "shape": list(shape), "rank": rank,
         **{f"basis_bytes_{d}": result[d]["basis_bytes"] for d in DTYPES}}
  for (dtype, method), values in errors.items():
    row[f"rel_error_{method}_{dtype}_mean"] = float(np.mean(values))
    row[f"rel_error_{method}_{dtype}_max"] = float(np.max(values))
  return row


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_9m", choices=sorted(llama.PRESETS))
  ap.add_argument("--group_size", type=int, default=256)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--out", default=None, help="default bench/results/quantized_bases-<backend>.json")
  return ap


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  if args.seeds < 1 or args.group_size < 2 or args.group_size % 2:
    common.fail(f"--seeds must be >= 1 and --group_size a positive even int, got {args.seeds}, {args.group_size}")
  rank = common.rank(args.preset)
  kernels = common.layer_kernels(llama.PRESETS[args.preset])
  rows = [shape_row(name, shape, min(rank, *shape), args.group_size, args.seeds) for name, shape in kernels.items()]
  record = {**common.provenance(__spec__.name, argv), "preset": args.preset, "group_size": args.group_size,
            "seeds": args.seeds, "gradient": "rank-8 signal + 0.1 Gaussian noise (synthetic)", "results": rows}
  print(f"{'kernel':<14} {'shape':>11} {'rank':>4} {'fp32 B':>8} {'bf16 B':>8} {'int4 B':>7} "
        f"{'proj int4':>9} {'proj bf16':>9} {'adam int4':>9} {'adam bf16':>9}")
  for r in rows:
    print(f"{r['kernel']:<14} {'x'.join(map(str, r['shape'])):>11} {r['rank']:>4} {r['basis_bytes_float32']:>8} "
          f"{r['basis_bytes_bfloat16']:>8} {r['basis_bytes_int4']:>7} {r['rel_error_projection_int4_mean']:>9.4f} "
          f"{r['rel_error_projection_bfloat16_mean']:>9.4f} {r['rel_error_adamw_int4_mean']:>9.4f} "
          f"{r['rel_error_adamw_bfloat16_mean']:>9.4f}")
  out = args.out or os.path.join(common.RESULTS, f"quantized_bases-{jax.default_backend()}.json")
  print(f"wrote {common.write_json(out, record)}")
  return record


if __name__ == "__main__":
  main()

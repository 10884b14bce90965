"""Where a subspace refresh spends its time: each kernel of one matrix's refresh, timed apart.

  python -m bench.refresh_parts [--preset llama_1b] [--repeats 5] [--parts randomized] [--out PATH]

For every distinct GaLore kernel shape of the preset (Flax layout, 'std' sides, the preset's paper rank r,
k = r + 10 columns) the building blocks of `RandomizedRefresh` are jitted and timed alone on random fp32
matrices: the range-finder matmuls, the LU and QR of the tall `[d, k]` blocks, the `k×k` Gram matrix and
its `eigh` (the default, and Jacobi and QDWH where the backend has them; jax 0.10 has no top-r subset
on CPU or GPU), a Cholesky of the Gram matrix, and the whole refresh of one matrix; also the exact SVD. Each time is the
median of --repeats calls after one warm-up call, ending with `block_until_ready`. `model_refresh_s` sums
the whole-refresh time over the preset's matrices (one refresh of every basis, done one matrix at a time as
galore_jax's looped refresh did before the two-stage refresh); `model_refresh_batched_finish_s` sums, per
matrix, the sketch (range finder and k×k matrix, one matrix at a time) plus its share of the finish run
batched as galore batches it (the faster of the default and Jacobi eigh): the two-stage refresh
that galore_jax now runs.

``--parts exact`` (alone or beside ``randomized``) times the exact refresh's kernels per shape instead: the Gram
refresh's (``refresh="gram"``) fp32 ``A Aᵀ`` of the short side ``s`` at ``Precision.HIGHEST``, its ``s×s`` eigh
(default and Jacobi, and the default batched over 4 matrices, per matrix), the long side's QR, the whole Gram
refresh with and without its deflated pass, and the direct SVD (``refresh="svd"``); ``model_exact_gram_s`` sums
the default Gram refresh over the preset's matrices. The matrices are Gaussian: a real gradient's clustered small
eigenvalues can make a divide-and-conquer eigh faster. Writes
bench/results/refresh_parts-<backend>-<preset>[-exact].json (``-exact`` when only those parts run).
"""

from __future__ import annotations

import json
import statistics
import sys

import jax
import jax.numpy as jnp

from bench import common
from galore_jax import RandomizedRefresh
from galore_jax.models import llama
from galore_jax.optim import basis as projection, linalg, refresh as refresh_lib
from galore_jax.optim.executors import finish_chunk

OVERSAMPLING = 10
PARTS = ("randomized", "exact")
DEFAULT_GRAM = f"whole gram refresh, {refresh_lib.GRAM_DEFLATIONS} deflation (default)"
EIGH_BATCH = 4  # Gram matrices per batched eigh call: 4 of Llama-7B's 4096 x 4096 fit the default finish budget


def kernel_shapes(cfg: llama.LlamaConfig) -> dict[tuple[int, int], int]:
  """(in, out) -> how many attention/MLP kernels of that shape the model has."""
  counts: dict[tuple[int, int], int] = {}
  for shape in common.layer_kernels(cfg).values():
    counts[shape] = counts.get(shape, 0) + cfg.num_hidden_layers
  return counts


def timed(fn, *args, repeats: int) -> float:
  """Median seconds of ``fn(*args)``, compiled ahead of time, after one warm-up call."""
  return statistics.median(common.timings(jax.jit(fn).lower(*args).compile(), *args, warmup=1, repeats=repeats))


def eigh_with(implementation: str, gram, repeats: int) -> float | None:
  """Seconds of ``eigh`` with a ``jax.lax.linalg.EighImplementation`` member, or None where it does not lower."""
  members = getattr(getattr(jax.lax.linalg, "EighImplementation", None), "__members__", {})
  if implementation not in members:
    return None
  try:
    return timed(lambda x: jax.lax.linalg.eigh(x, implementation=members[implementation]), gram, repeats=repeats)
  except NotImplementedError:  # e.g. Jacobi on CPU
    return None


def parts_of(m: int, n: int, rank: int, count: int, repeats: int) -> dict[str, float | None]:
  """Seconds per call of each refresh kernel for one gradient [m, n] (input side found when m <= n).

  The finish (small eigh and the product with the range) is also timed batched over as many of the ``count``
  matrices of the shape as galore's looped refresh batches (``RandomizedRefresh.batch_budget_bytes``).
  """
  sides = projection.choose_sides("std", m, n)
  rank = projection.clipped_rank(rank, m, n)
  d, e = (m, n) if sides.input else (n, m)  # found side d, other side e
  k = min(rank + OVERSAMPLING, d, e)
  key = jax.random.key(0)
  a = jax.random.normal(key, (d, e), jnp.float32)
  omega = jax.random.normal(jax.random.fold_in(key, 1), (e, k), jnp.float32)
  block_d = a @ omega
  block_e = a.T @ block_d
  gram = (block_d.T @ a) @ (a.T @ block_d) + jnp.eye(k)
  grad = a if sides.input else a.T
  previous = projection.identity_basis((m, n), rank, sides, jnp.float32)
  refresh = RandomizedRefresh()
  out = {
      "range_matmul A@omega": timed(lambda a, o: a @ o, a, omega, repeats=repeats),
      f"lu other side [{e},{k}]": timed(linalg.lu_basis, block_e, repeats=repeats),
      f"lu found side [{d},{k}]": timed(linalg.lu_basis, block_d, repeats=repeats),
      f"qr [{d},{k}]": timed(linalg.orth, block_d, repeats=repeats),
      f"gram (QtA)(QtA)t [{k},{k}]": timed(lambda q, a: (q.T @ a) @ (q.T @ a).T, block_d, a, repeats=repeats),
      f"cholesky [{k},{k}]": timed(jnp.linalg.cholesky, gram, repeats=repeats),
      f"eigh [{k},{k}]": timed(jnp.linalg.eigh, gram, repeats=repeats),
  }
  for name in ("JACOBI", "QDWH"):
    out[f"eigh {name.lower()} [{k},{k}]"] = eigh_with(name, gram, repeats)
  out["whole randomized refresh"] = timed(
      lambda g, p, key: refresh(g, p, rank, key=key, warm=False), grad, previous, key, repeats=repeats)
  sketch = jax.jit(lambda g, p, key: refresh.sketch(g, p, rank, key=key, warm=False))(grad, previous, key)
  out["sketch (everything that reads the gradient)"] = timed(
      lambda g, p, key: refresh.sketch(g, p, rank, key=key, warm=False), grad, previous, key, repeats=repeats)
  out["finish, one matrix"] = timed(lambda s, p: refresh.finish(s, p, rank, warm=False), sketch, previous,
                                    repeats=repeats)
  chunk = finish_chunk(count, sum(x.nbytes for x in jax.tree.leaves(sketch)), refresh.batch_budget_bytes)
  stack = lambda tree: jax.tree.map(lambda x: jnp.array(jnp.broadcast_to(x, (chunk, *x.shape))), tree)
  sketches, previous_stack = stack(sketch), stack(previous)
  for name, fn in (("default", refresh), ("jacobi", RandomizedRefresh(eigh_algorithm="jacobi"))):
    label = f"finish batched x{chunk}, {name} eigh, per matrix"
    if name == "jacobi" and jax.default_backend() == "cpu":
      out[label] = None  # no Jacobi eigh on CPU
      continue
    out[label] = timed(lambda s, p, fn=fn: fn.finish(s, p, rank, warm=False), sketches, previous_stack,
                       repeats=repeats) / chunk
  out["exact svd"] = timed(lambda g: refresh_lib.svd_basis(g, rank, sides), grad, repeats=max(1, repeats // 2))
  return out


def exact_parts_of(m: int, n: int, rank: int, repeats: int) -> dict[str, float | None]:
  """Seconds per call of each kernel of an exact refresh of one gradient [m, n] (see the module's docstring)."""
  sides = projection.choose_sides("std", m, n)
  rank = projection.clipped_rank(rank, m, n)
  grad = jax.random.normal(jax.random.key(0), (m, n), jnp.float32)
  a = grad if m <= n else grad.T  # [s, l]: the short side first
  s, l = a.shape
  gram = linalg.exact_matmul(a, a.T)
  long_side = a.T @ jnp.linalg.eigh(gram)[1][:, -rank:]  # [l, r] = V_r Σ_r, what the Gram refresh orthonormalises
  gram_refresh = lambda deflations: lambda g: refresh_lib.gram_basis(g, rank, sides, deflations=deflations)
  slow = max(1, repeats // 2)
  out = {
      f"gram A Aᵀ [{s},{s}] (HIGHEST)": timed(lambda a: linalg.exact_matmul(a, a.T), a, repeats=repeats),
      f"eigh [{s},{s}]": timed(jnp.linalg.eigh, gram, repeats=slow),
      f"eigh jacobi [{s},{s}]": eigh_with("JACOBI", gram, slow),
      f"eigh batched x{EIGH_BATCH} [{s},{s}], per matrix":
          timed(jnp.linalg.eigh, jnp.stack([gram] * EIGH_BATCH), repeats=slow) / EIGH_BATCH,
      f"qr [{l},{rank}]": timed(linalg.qr, long_side, repeats=repeats),
      "whole gram refresh, no deflation": timed(gram_refresh(0), grad, repeats=slow),
      DEFAULT_GRAM: timed(gram_refresh(refresh_lib.GRAM_DEFLATIONS), grad, repeats=slow),
      "exact svd": timed(lambda g: refresh_lib.svd_basis(g, rank, sides), grad, repeats=slow),
  }
  return out


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--preset", default="llama_1b", choices=common.PRESETS)
  ap.add_argument("--repeats", type=common.int_within(1), default=5)
  ap.add_argument("--parts", nargs="+", choices=PARTS, default=["randomized"],
                  help="which refresh's kernels to time (exact: refresh='gram' and 'svd')")
  ap.add_argument("--out", default=None, help="default bench/results/refresh_parts-<backend>-<preset>[-exact].json")
  return ap


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  rank = common.rank(args.preset)
  suffix = "" if "randomized" in args.parts else "-exact"
  path = args.out or f"{common.RESULTS}/refresh_parts-{jax.default_backend()}-{args.preset}{suffix}.json"
  record = {
      **common.provenance(__spec__.name, argv),
      "preset": args.preset, "rank": rank, "oversampling": OVERSAMPLING, "repeats": args.repeats,
      "parts": args.parts,
      "refresh": "RandomizedRefresh() defaults: 1 LU-stabilised power iteration, QR, eigh of the k x k Gram matrix; "
                 "finish = eigh, the product with the range, sign alignment; exact: gram_basis (refresh='gram') "
                 "and svd_basis (refresh='svd')",
      "results": [],
  }

  def add(key: str, seconds: float) -> None:  # a model total: seconds summed over the preset's matrices
    record[key] = record.get(key, 0.0) + seconds

  for (m, n), count in kernel_shapes(llama.preset(args.preset)).items():
    row = {"shape": [m, n], "count": count}
    if "randomized" in args.parts:
      row["seconds"] = parts = parts_of(m, n, rank, count, args.repeats)
      batched = [v for k, v in parts.items() if k.startswith("finish batched") and v is not None]
      add("model_refresh_s", count * parts["whole randomized refresh"])
      add("model_refresh_batched_finish_s", count * (parts["sketch (everything that reads the gradient)"]
                                                     + min(batched)))
    if "exact" in args.parts:
      row["exact_seconds"] = parts = exact_parts_of(m, n, rank, args.repeats)
      add("model_exact_gram_s", count * parts[DEFAULT_GRAM])
      add("model_exact_gram_no_deflation_s", count * parts["whole gram refresh, no deflation"])
    add("model_exact_svd_s", count * parts["exact svd"])  # the exact parts' own when both ran
    record["results"].append(row)
    common.write_json(path, record)  # after each shape: a time limit keeps the shapes that finished
    timings = {**row.get("seconds", {}), **row.get("exact_seconds", {})}
    print(f"[{m}, {n}] x{count}: " + ", ".join(f"{k} {'-' if v is None else f'{v * 1e3:.2f} ms'}"
                                             for k, v in timings.items()), flush=True)
  print(json.dumps({**{k: round(v, 3) for k, v in record.items() if k.startswith("model_")}, "out": path}))
  return record


if __name__ == "__main__":
  main()
